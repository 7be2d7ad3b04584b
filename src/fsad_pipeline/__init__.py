"""Few-shot industrial anomaly detection as a Kedro project."""

__version__ = "0.1.0"
