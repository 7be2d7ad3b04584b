"""Project pipelines: one per folder under ``pipelines/`` (each stage, and ``dfd``, the chain)."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    # Kedro 1.7 may load only the requested pipelines, so nothing here assumes the others exist.
    pipelines = find_pipelines(raise_errors=True)
    if "dfd" in pipelines:
        pipelines["__default__"] = pipelines["dfd"]
    return pipelines
