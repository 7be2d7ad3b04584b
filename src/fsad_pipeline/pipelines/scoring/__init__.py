"""``scoring``: trained model + test images → anomaly maps, image scores and verdicts."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
