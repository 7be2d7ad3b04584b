"""``promotion``: the ``dfd`` run's artifacts → a model bundle → the champion store (not a DVC stage)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
