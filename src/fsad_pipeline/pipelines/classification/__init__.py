"""``classification``: which defect is it? Residual-encoder classifier and two baselines on the flagged images."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
