"""Thin nodes over ``fsad_pipeline.data``."""

from __future__ import annotations

import pandas as pd

from fsad_pipeline.data.layouts import discover
from fsad_pipeline.data.manifest import build_manifest
from fsad_pipeline.data.sampling import select_defect_shots, select_support


def build_image_manifest(data: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Discover the category's images (materialising the textile data if chosen) and validate them."""
    source = data["source"]
    records = discover(source, data["root"], data["category"], **(data.get(source) or {}))
    return build_manifest(
        records,
        max_pixels=int(data["max_pixels"]),
        on_bad_image=data["on_bad_image"],
        mask_threshold=int(data["mask_threshold"]),
    )


def select_support_shots(manifest: pd.DataFrame, k_shot: int, seed: int, rounds: int) -> dict:
    return select_support(manifest, k_shot=int(k_shot), seed=int(seed), rounds=int(rounds))


def select_labelled_defects(manifest: pd.DataFrame, k_defect_shots: int, seed: int) -> dict:
    return select_defect_shots(manifest, k_defect_shots=int(k_defect_shots), seed=int(seed))
