"""``inference``: the promoted model + new images → verdict, score, overlay per image (not a DVC stage)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
