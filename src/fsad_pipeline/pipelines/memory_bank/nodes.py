"""Thin nodes over ``fsad_pipeline.synthesis.support_augmentation`` and ``fsad_pipeline.scoring.patch_scorers``."""

from __future__ import annotations

import numpy as np

from fsad_pipeline.data.sampling import load_gt_masks, load_images
from fsad_pipeline.models.features import select_device
from fsad_pipeline.pipelines.training.nodes import feature_config
from fsad_pipeline.scoring.patch_scorers import PatchScorerSet, fit_patch_scorers
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet
from fsad_pipeline.synthesis.support_augmentation import SupportAugmentationConfig, augment_support


def augment_support_images(support_images: np.ndarray, support_augmentation: dict) -> np.ndarray:
    return augment_support(support_images, SupportAugmentationConfig.from_dict(support_augmentation))


def fit_memory_banks(
    augmented_support: np.ndarray,
    support_images: np.ndarray,
    synthetic_validation: PseudoAnomalySet,
    defect_shots: dict,
    manifest,
    backbone: str,
    image_size: int,
    memory_bank: dict,
    seed: int,
    device: str,
) -> tuple[PatchScorerSet, dict]:
    """The fitted patch scorers, and their leave-one-support-out outputs on the validation split."""
    features = feature_config(memory_bank.get("backbone") or backbone, image_size, memory_bank["features"])
    defect_paths = sorted(p for paths in defect_shots["shots"].values() for p in paths)
    defect_images = defect_masks = None
    if defect_paths:
        rows = manifest.set_index("path").loc[defect_paths]
        defect_images = load_images(defect_paths, int(image_size))
        defect_masks, has_mask = load_gt_masks(rows["mask_path"].tolist(), rows["label"].tolist(), int(image_size))
        if not has_mask.all():
            defect_masks = None  # no mask for some shots: use the top-scoring patches for all of them
    return fit_patch_scorers(
        augmented_support,
        features,
        knn=memory_bank["knn"],
        gaussian=memory_bank["gaussian"],
        anomalous_bank=memory_bank["anomalous_bank"],
        n_supports=len(support_images),
        validation_images=synthetic_validation.images,
        validation_sources=synthetic_validation.source_index,
        map_sigma=float(memory_bank["map_sigma"]),
        defect_images=defect_images,
        defect_masks=defect_masks,
        seed=int(seed),
        device=str(select_device(device)),
    )
