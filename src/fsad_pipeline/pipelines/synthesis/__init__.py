"""``synthesis``: support images → foreground masks, pseudo-anomalous training set, synthetic validation set."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
