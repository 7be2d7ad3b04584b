"""``dfd``: the whole chain, stage after stage (each stage is also a pipeline of its own)."""

from .pipeline import DFD_STAGES, create_pipeline

__all__ = ["DFD_STAGES", "create_pipeline"]
