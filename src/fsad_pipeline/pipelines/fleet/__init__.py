"""``fleet``: the ``dfd`` chain once per category (Kedro namespaces), plus one fleet-wide table."""

from .pipeline import build_fleet_pipeline, create_pipeline

__all__ = ["build_fleet_pipeline", "create_pipeline"]
