"""Thin nodes over ``fsad_pipeline.data``."""

from __future__ import annotations

import logging

import pandas as pd

from fsad_pipeline.data.geometry import working_size_record
from fsad_pipeline.data.manifest import manifest_from_parameters
from fsad_pipeline.data.sampling import check_support_pool, select_defect_shots, select_support, support_pool

logger = logging.getLogger(__name__)


def build_image_manifest(data: dict, k_shot: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Discover the category's images (materialising the textile data if chosen) and validate them.

    Fails before anything is saved when the support pool cannot give ``k_shot`` images, so the
    manifest on disk and the support selection always describe the same drop."""
    manifest, rejects = manifest_from_parameters(data)
    check_support_pool(manifest, int(k_shot), rejected=len(rejects))
    return manifest, rejects


def select_support_shots(manifest: pd.DataFrame, k_shot: int, seed: int, rounds: int) -> dict:
    return select_support(manifest, k_shot=int(k_shot), seed=int(seed), rounds=int(rounds))


def select_labelled_defects(manifest: pd.DataFrame, k_defect_shots: int, seed: int) -> dict:
    return select_defect_shots(manifest, k_defect_shots=int(k_defect_shots), seed=int(seed))


def resolve_working_size(
    manifest: pd.DataFrame, image_size: int | list, image_layout: str, image_size_multiple: int,
    image_max_upscale: float | None = None,
) -> dict:
    """working_size.json: the (H, W) every later stage resizes images to, from the support pool's sizes."""
    record = working_size_record(
        support_pool(manifest), image_size, layout=str(image_layout), multiple=int(image_size_multiple),
        max_upscale=None if image_max_upscale is None else float(image_max_upscale),
    )
    logger.info(
        "working size %sx%s (H x W; %s, median native size %s, median aspect %s)",
        *record["image_size"], record["layout"], record["median_native_hw"], record["median_aspect"],
    )
    return record
