"""``memory_bank``: augmented support set → memory-bank kNN, per-position Gaussian, anomalous bank."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
