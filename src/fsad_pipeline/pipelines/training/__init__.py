"""``training``: pseudo-anomalies → cached backbone features → trained DFD discriminators."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
