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

from fsad_pipeline.data.geometry import as_hw
from fsad_pipeline.models.anomaly_map import patch_scores_to_map
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


#: What the anomalous bank measures the normal distance d_n against (``anomalous_bank.normal_bank``).
NORMAL_BANKS = ("coreset", "all")


def _normal_bank(choice: str, knn_scorer: MemoryBankScorer, support_features: torch.Tensor) -> torch.Tensor:
    """The normal patches of the anomalous bank: the kNN scorer's coreset (raw vectors) or every support patch.

    ``coreset`` (default): the k-center coreset already covers every support patch within its
    radius, so d_n moves by at most that radius, and the search is 10x smaller at coreset 0.1
    (the profile of the default run: the all-patch bank was 136 s of 216 s of scoring).
    """
    if choice == "coreset":
        return torch.from_numpy(np.ascontiguousarray(knn_scorer.bank))
    if choice == "all":
        return support_features.permute(0, 2, 3, 1).reshape(-1, support_features.shape[1])
    raise ValueError(f"anomalous_bank.normal_bank must be one of {NORMAL_BANKS}, got {choice!r}")


def _fit_anomalous_bank(
    defect_features: torch.Tensor,
    defect_masks: np.ndarray | None,
    knn_scorer: MemoryBankScorer,
    support_features: torch.Tensor,
    anomalous_bank: dict,
    seed: int,
) -> AnomalousBankScorer:
    with torch.inference_mode():
        fallback = knn_scorer.patch_scores(defect_features)
    masks = None if defect_masks is None else torch.from_numpy(defect_masks.astype(np.float32))
    options = {k: v for k, v in anomalous_bank.items() if k not in ("top_fraction", "normal_bank")}
    anomalous = select_anomalous_patches(
        defect_features, masks, fallback_scores=fallback, top_fraction=float(anomalous_bank["top_fraction"])
    )
    normal = _normal_bank(anomalous_bank.get("normal_bank", "coreset"), knn_scorer, support_features)
    logger.info("anomalous bank: %d patches from %d labelled defect images", anomalous.shape[0], len(defect_features))
    return AnomalousBankScorer(**options, seed=seed).fit(anomalous, normal)


def _fit_scorers(
    support_features: torch.Tensor,
    *,
    knn: dict,
    gaussian: dict,
    anomalous_bank: dict,
    defect_features: torch.Tensor | None,
    defect_masks: np.ndarray | None,
    seed: int,
    progress: bool,
    knn_scorer: MemoryBankScorer | None = None,
) -> dict[str, Any]:
    """Every enabled scorer fitted on ``support_features``; ``knn_scorer``: a kNN bank already built for them."""
    scorers: dict[str, Any] = {}
    if knn_scorer is None:
        knn_scorer = MemoryBankScorer(**knn, seed=seed, progress=progress).fit(support_features)
    scorers["knn"] = knn_scorer
    if gaussian.get("enabled", False):
        options = {k: v for k, v in gaussian.items() if k != "enabled"}
        scorers["gaussian"] = PositionGaussianScorer(**options, seed=seed, progress=progress).fit(support_features)
    if defect_features is not None and len(defect_features):
        scorers["anomalous_bank"] = _fit_anomalous_bank(
            defect_features, defect_masks, knn_scorer, support_features, anomalous_bank, seed
        )
    return scorers


def _write_rows(target: dict[str, dict[str, np.ndarray]], outputs: dict, rows: np.ndarray, total: int) -> None:
    for name, out in outputs.items():
        slot = target.setdefault(name, {
            "anomaly_map": np.zeros((total, *out["anomaly_map"].shape[1:]), np.float32),
            "pred_score": np.zeros(total, np.float32),
        })
        slot["anomaly_map"][rows] = out["anomaly_map"]
        slot["pred_score"][rows] = out["pred_score"]


def _shared_search(scorers: dict[str, Any], features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Patch scores of the kNN scorer and the anomalous bank from one search when the bank's
    normal distance is measured against the kNN coreset (the default, ``normal_bank: coreset``);
    empty otherwise, and each scorer searches on its own."""
    knn, anomalous = scorers.get("knn"), scorers.get("anomalous_bank")
    if knn is None or anomalous is None or not anomalous.measures_normal_distance_to(knn.bank):
        return {}
    knn_scores, normal_distance = knn.patch_scores_and_raw_distances(features)
    return {"knn": knn_scores, "anomalous_bank": anomalous.patch_scores(features, normal_distance=normal_distance)}


def score_patch_features(
    scorers: dict[str, Any], features: torch.Tensor, image_size: int | tuple[int, int], sigma: float
) -> dict[str, dict[str, np.ndarray]]:
    """Each patch scorer's anomaly maps (upsampled + smoothed) and image scores for shared features."""
    size = as_hw(image_size)
    outputs = {}
    with torch.inference_mode():
        patch_scores = _shared_search(scorers, features)
        for name, scorer in scorers.items():
            patch = patch_scores[name] if name in patch_scores else scorer.patch_scores(features)
            maps = patch_scores_to_map(patch.float(), size, sigma)
            outputs[name] = {
                "anomaly_map": maps.cpu().numpy().astype(np.float32),
                "pred_score": scorer.image_scores(features, patch).cpu().numpy().astype(np.float32),
            }
    return outputs


def fit_patch_scorers(
    augmented_support: np.ndarray,
    features: FeatureConfig,
    *,
    knn: dict,
    gaussian: dict,
    anomalous_bank: dict,
    n_supports: int = 1,
    validation_images: np.ndarray | None = None,
    validation_sources: np.ndarray | None = None,
    validation_defect_shots: np.ndarray | None = None,
    map_sigma: float = 4.0,
    defect_images: np.ndarray | None = None,
    defect_masks: np.ndarray | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[PatchScorerSet, dict[str, dict[str, np.ndarray]]]:
    """Fit every enabled patch scorer on the augmented supports ((k·n, H, W, 3), image-major).

    Also returns each scorer's outputs on the validation images, scored without the very image
    a row was made from:

    * a row made from a good image that is no support (``validation_sources`` −1 outside the
      defect views) is scored by the fitted scorers, as a new image is;
    * a synthetic sample made from support ``i`` (``validation_sources``) is scored by scorers
      fitted without support ``i``'s augmentations. A memory bank that contains the very image
      it scores reads ~0 on it, which would make validation normals look perfect and bias the
      fusion weights and normalisation; left out, they behave like unseen normals. With one
      support there is nothing to leave out and the full scorers are used (said in the log).
      The fold's kNN bank is the full coreset minus the vectors taken from support ``i``
      (:meth:`MemoryBankScorer.leave_out_images`: no coreset pass per fold); the other scorers
      are refitted on the remaining supports.
    * a view of labelled defect shot ``j`` (``validation_defect_shots``, −1 elsewhere) is scored
      by the normal scorers and by an anomalous bank fitted without shot ``j`` (with a single
      shot, by the full bank: optimistic, said in the log).
    """
    extractor = features.build_extractor()
    common = dict(image_size=features.image_size, batch_size=features.batch_size, device=device, dual_path=False)
    support_features = extract_features(extractor, augmented_support, progress=progress, desc="features (support)", **common)
    defect_features = None
    if defect_images is not None and len(defect_images):
        defect_features = extract_features(extractor, defect_images, progress=progress, desc="features (defects)", **common)
    options = dict(knn=knn, gaussian=gaussian, anomalous_bank=anomalous_bank, seed=seed)
    scorers = _fit_scorers(
        support_features, defect_features=defect_features, defect_masks=defect_masks, progress=progress, **options
    )
    # map_sigma travels with the banks: the test maps must be smoothed as the validation's were.
    info = {"augmented_support_images": int(len(augmented_support)), "feature_dim": extractor.feature_dim,
            "map_sigma": float(map_sigma)}
    if validation_images is None or not len(validation_images):
        return PatchScorerSet(features, scorers, info), {}
    total = len(validation_images)
    validation_features = extract_features(
        extractor, validation_images, progress=progress, desc="features (validation)", **common
    )
    sources = np.asarray(validation_sources if validation_sources is not None else np.zeros(total), dtype=np.int64)
    shots = np.asarray(validation_defect_shots if validation_defect_shots is not None else np.full(total, -1), dtype=np.int64)
    validation: dict[str, dict[str, np.ndarray]] = {}

    def score_rows(fold: dict[str, Any], rows: np.ndarray) -> None:
        outputs = score_patch_features(fold, validation_features[torch.from_numpy(rows)], features.image_size, map_sigma)
        _write_rows(validation, outputs, rows, total)

    synthetic = np.flatnonzero(shots < 0)
    unseen = synthetic[sources[synthetic] < 0]
    synthetic = synthetic[sources[synthetic] >= 0]
    if unseen.size:  # made from good images that are no support: the full scorers, as for a new image
        score_rows(scorers, unseen)
        info["validation"] = "unseen good images"
    if synthetic.size and n_supports < 2:
        logger.info("one support image: validation is scored by banks that contain it (optimistic)")
        score_rows(scorers, synthetic)
        info["validation"] = "in-bank"
    elif synthetic.size:
        views = len(augmented_support) // n_supports
        for left_out in range(n_supports):
            rows = synthetic[sources[synthetic] == left_out]
            if rows.size == 0:
                continue
            first, stop = left_out * views, (left_out + 1) * views
            keep = torch.ones(len(augmented_support), dtype=torch.bool)
            keep[first:stop] = False
            fold = _fit_scorers(
                support_features[keep], defect_features=defect_features, defect_masks=defect_masks,
                progress=False, knn_scorer=scorers["knn"].leave_out_images(first, stop), **options,
            )
            score_rows(fold, rows)
        info["validation"] = "leave-one-support-out"
    n_shots = 0 if defect_features is None else len(defect_features)
    for shot in np.unique(shots[shots >= 0]):
        rows = np.flatnonzero(shots == shot)
        fold = dict(scorers)
        if n_shots > 1:
            keep = np.arange(n_shots) != shot
            fold["anomalous_bank"] = _fit_anomalous_bank(
                defect_features[torch.from_numpy(keep)], None if defect_masks is None else defect_masks[keep],
                scorers["knn"], support_features, anomalous_bank, seed,
            )
        elif "anomalous_bank" in fold:
            logger.info("one labelled defect shot: its views are scored by the bank that contains it (optimistic)")
        score_rows(fold, rows)
    info["validation_defect_views"] = int((shots >= 0).sum())
    return PatchScorerSet(features, scorers, info), validation
