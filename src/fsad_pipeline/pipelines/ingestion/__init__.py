"""``ingestion``: raw images → validated manifest, rejects report, k-shot support selection."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
