"""The patch-feature scorers fitted on the augmented support set, saved and loaded together.

``fit_patch_scorers`` extracts the augmented supports' patch features once and fits the
memory-bank kNN scorer, the per-position Gaussian (when enabled) and the anomalous bank (when
labelled defect shots exist) on them. Everything lands in one folder: ``features.json`` plus one
sub-folder per scorer in that scorer's own safe format.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsad_pipeline.models.anomalous_bank import AnomalousBankScorer, select_anomalous_patches
from fsad_pipeline.models.features import PatchFeatureExtractor, extract_features
from fsad_pipeline.models.gaussian import PositionGaussianScorer
from fsad_pipeline.models.memory_bank import MemoryBankScorer
from fsad_pipeline.scoring.dfd_scorer import FeatureConfig

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.json"
SCORER_TYPES = {"knn": MemoryBankScorer, "gaussian": PositionGaussianScorer, "anomalous_bank": AnomalousBankScorer}


@dataclass
class PatchScorerSet:
    features: FeatureConfig
    scorers: dict[str, Any] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def build_extractor(self) -> PatchFeatureExtractor:
        return self.features.build_extractor()

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / FEATURES_FILE).write_text(
            json.dumps({"features": asdict(self.features), "scorers": list(self.scorers), "info": self.info}, indent=2)
        )
        for name, scorer in self.scorers.items():
            scorer.save(directory / name)

    @classmethod
    def load(cls, directory: str | Path) -> PatchScorerSet:
        directory = Path(directory)
        payload = json.loads((directory / FEATURES_FILE).read_text())
        scorers = {name: SCORER_TYPES[name].load(directory / name) for name in payload["scorers"]}
        return cls(FeatureConfig.from_dict(payload["features"]), scorers, payload.get("info", {}))


def fit_patch_scorers(
    augmented_support: np.ndarray,
    features: FeatureConfig,
    *,
    knn: dict,
    gaussian: dict,
    anomalous_bank: dict,
    defect_images: np.ndarray | None = None,
    defect_masks: np.ndarray | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> PatchScorerSet:
    """Fit every enabled patch scorer on the augmented support images (k·n, H, W, 3)."""
    extractor = features.build_extractor()
    common = dict(image_size=features.image_size, batch_size=features.batch_size, device=device, dual_path=False)
    support_features = extract_features(extractor, augmented_support, progress=progress, desc="features (support)", **common)
    scorers: dict[str, Any] = {}
    knn_scorer = MemoryBankScorer(**knn, seed=seed, progress=progress).fit(support_features)
    scorers["knn"] = knn_scorer
    if gaussian.get("enabled", False):
        options = {k: v for k, v in gaussian.items() if k != "enabled"}
        scorers["gaussian"] = PositionGaussianScorer(**options, seed=seed, progress=progress).fit(support_features)
    if defect_images is not None and len(defect_images):
        defect_features = extract_features(extractor, defect_images, progress=progress, desc="features (defects)", **common)
        with torch.inference_mode():
            fallback = knn_scorer.patch_scores(defect_features)
        masks = None if defect_masks is None else torch.from_numpy(defect_masks.astype(np.float32))
        options = {k: v for k, v in anomalous_bank.items() if k not in ("top_fraction",)}
        anomalous = select_anomalous_patches(
            defect_features, masks, fallback_scores=fallback, top_fraction=float(anomalous_bank["top_fraction"])
        )
        normal = support_features.permute(0, 2, 3, 1).reshape(-1, support_features.shape[1])
        scorers["anomalous_bank"] = AnomalousBankScorer(**options, seed=seed).fit(anomalous, normal)
        logger.info("anomalous bank: %d patches from %d labelled defect images", anomalous.shape[0], len(defect_images))
    info = {"augmented_support_images": int(len(augmented_support)), "feature_dim": extractor.feature_dim}
    return PatchScorerSet(features, scorers, info)
