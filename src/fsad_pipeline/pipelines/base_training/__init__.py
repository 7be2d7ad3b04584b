"""``base_training``: base categories (target left out) → STN + Siamese encoder → encoder registry."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
