"""Thin nodes over ``fsad_pipeline.synthesis.support_augmentation`` and ``fsad_pipeline.scoring.patch_scorers``."""

from __future__ import annotations

import numpy as np

from fsad_pipeline.data.geometry import as_hw
from fsad_pipeline.data.sampling import load_defect_shots
from fsad_pipeline.models.features import select_device
from fsad_pipeline.pipelines.training.nodes import feature_config
from fsad_pipeline.scoring.patch_scorers import PatchScorerSet, fit_patch_scorers
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet
from fsad_pipeline.synthesis.support_augmentation import (
    SupportAugmentationConfig,
    augment_support,
    with_labelled_defects,
)


def augment_support_images(support_images: np.ndarray, support_augmentation: dict) -> np.ndarray:
    return augment_support(support_images, SupportAugmentationConfig.from_dict(support_augmentation))


def build_fusion_validation(
    synthetic_validation: PseudoAnomalySet,
    defect_shots: dict,
    manifest,
    image_size: int,
    defect_views: dict,
    mask_threshold: int = 0,
) -> PseudoAnomalySet:
    """The synthetic validation split plus augmented labelled defect shots (when any).

    A shot without a ground-truth mask has an all-zero mask here, so its views are marked
    ``mask_known`` False.
    """
    images, masks, _ = load_defect_shots(manifest, defect_shots, as_hw(image_size), mask_threshold=int(mask_threshold))
    config = SupportAugmentationConfig.from_dict(defect_views)
    return with_labelled_defects(synthetic_validation, images, masks, config)


def fit_memory_banks(
    augmented_support: np.ndarray,
    support_images: np.ndarray,
    fusion_validation: PseudoAnomalySet,
    defect_shots: dict,
    manifest,
    backbone: str,
    image_size: int,
    memory_bank: dict,
    seed: int,
    device: str,
    mask_threshold: int = 0,
) -> tuple[PatchScorerSet, dict]:
    """The fitted patch scorers, and their leave-one-out outputs on the fusion validation set."""
    features = feature_config(memory_bank.get("backbone") or backbone, image_size, memory_bank["features"])
    defect_images, defect_masks, has_mask = load_defect_shots(
        manifest, defect_shots, as_hw(image_size), mask_threshold=int(mask_threshold)
    )
    if not has_mask.all():
        defect_masks = None  # no mask for some shots: use the top-scoring patches for all of them
    return fit_patch_scorers(
        augmented_support,
        features,
        knn=memory_bank["knn"],
        gaussian=memory_bank["gaussian"],
        anomalous_bank=memory_bank["anomalous_bank"],
        n_supports=len(support_images),
        validation_images=fusion_validation.images,
        validation_sources=fusion_validation.source_index,
        validation_defect_shots=fusion_validation.defect_shot,
        map_sigma=float(memory_bank["map_sigma"]),
        defect_images=defect_images if len(defect_images) else None,
        defect_masks=defect_masks,
        seed=int(seed),
        device=str(select_device(device)),
    )
