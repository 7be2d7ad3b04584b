"""Thin nodes over ``fsad_pipeline.scoring``: fit the fusion on validation data, score the test set."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from fsad_pipeline.data.geometry import as_hw
from fsad_pipeline.data.sampling import defect_shot_paths, evaluation_set, load_images, unseen_good_paths
from fsad_pipeline.models.features import select_device
from fsad_pipeline.scoring.batch import fused_scores_of_paths, score_paths
from fsad_pipeline.scoring.calibration import calibrate_threshold
from fsad_pipeline.scoring.dfd_scorer import DFDScorer, score_held_out_in_chunks
from fsad_pipeline.scoring.ensemble import assemble, build_winclip, score_in_chunks
from fsad_pipeline.scoring.fusion import Fusion, fit_fusion
from fsad_pipeline.scoring.patch_scorers import PatchScorerSet
from fsad_pipeline.synthesis.anomalies import ORIGINAL_VIEW, PseudoAnomalySet
from fsad_pipeline.synthesis.support_augmentation import SupportAugmentationConfig, views_of_good_images


logger = logging.getLogger(__name__)

# Keys of the ``fusion`` parameters passed on to ``fit_fusion`` (``defect_views`` is the memory_bank stage's).
FUSION_OPTIONS = (
    "search", "n_trials", "min_gain", "score_preference", "normal_quantile", "normal_pixel_quantile", "score_scale",
    "max_pixels", "specialists", "specialist_maps",
)
#: The outputs of every scorer per validation row.
_OUTPUT_KEYS = ("anomaly_map", "pred_score")


def _ensemble(dfd_model, patch_scorers, support_images, winclip, image_size, device, fusion=None):
    device = str(select_device(device))
    return assemble(
        dfd_model,
        patch_scorers,
        image_size=as_hw(image_size),
        winclip_scorer=build_winclip(support_images, winclip, device=device),
        device=device,
        fusion=fusion,
    )


@dataclass(frozen=True)
class _ValidationRows:
    """The per-row arrays the weight search reads: the fusion validation set's, extended by
    unseen good images (label 0, an empty known mask, family "normal") and by views of them."""

    labels: np.ndarray
    masks: np.ndarray | None
    mask_known: np.ndarray | None
    families: np.ndarray | None
    real: np.ndarray
    unseen: np.ndarray
    views: np.ndarray

    @classmethod
    def of(cls, validation: PseudoAnomalySet) -> _ValidationRows:
        """The set's rows; its normals are unseen good images when it was made from them."""
        return cls(validation.labels, validation.masks, validation.mask_known, getattr(validation, "family", None),
                   validation.defect_shot >= 0, validation.from_unseen & (validation.labels == 0), validation.view)

    def with_good(self, views: np.ndarray) -> _ValidationRows:
        """These rows followed by good images in ``views`` (``"original"``: unseen ones as taken)."""
        n = len(views)

        def extend(array: np.ndarray | None, value) -> np.ndarray | None:
            return None if array is None else np.concatenate([array, np.full((n, *array.shape[1:]), value, array.dtype)])

        return _ValidationRows(extend(self.labels, 0), extend(self.masks, 0), extend(self.mask_known, True),
                               extend(self.families, "normal"), extend(self.real, False),
                               np.concatenate([self.unseen, np.asarray(views) == ORIGINAL_VIEW]),
                               np.concatenate([self.views, np.asarray(views, dtype=self.views.dtype)]))


def fit_score_fusion(
    dfd_model: DFDScorer,
    patch_scorers: PatchScorerSet,
    patch_validation: dict,
    support_images: np.ndarray,
    fusion_validation: PseudoAnomalySet,
    manifest: pd.DataFrame | None,
    support_selection: dict | None,
    fusion: dict,
    threshold: dict,
    winclip: dict,
    data: dict,
    image_size: int,
    seed: int,
    device: str,
) -> dict:
    """Per-scorer normalisation and fusion weights on validation data, then the decision threshold.

    The validation set is the synthetic split plus augmented labelled defect shots (when any).
    Its normals are ``fusion.unseen_normals`` good images of the support pool that the model
    never saw, scored by the fitted scorers as a test image is (:func:`fit_fusion`'s
    ``unseen``): the split's own normals when it was made from them (``synthesis.validation.base``),
    else they are scored here and appended to the split made from the supports.
    The patch scorers' validation outputs come from the memory_bank stage (leave-one-out);
    the image scorers (DFD, WinCLIP) score the validation images here. The record's
    ``validation`` holds the per-scorer and fused validation AUROCs (and per pseudo-anomaly
    family when the validation set carries a ``family`` array) next to the row counts. The
    threshold comes from real good images the model never saw (:func:`calibrate_decision`).
    """
    # One ensemble (WinCLIP is built once): DFD scores the validation held out, so only the other
    # image scorers score it here; every scorer scores the unseen and the calibration images.
    full = _ensemble(dfd_model, patch_scorers, support_images, winclip, image_size, device)
    image_only = replace(full, image_scorers={n: s for n, s in full.image_scorers.items() if n != "dfd"}, patch_scorers={})
    outputs = {
        "dfd": score_held_out_in_chunks(dfd_model, fusion_validation.images, fusion_validation.source_index),
        **score_in_chunks(image_only, fusion_validation.images),
        **patch_validation,
    }
    calibration, unseen_paths = (
        unseen_good_paths(
            manifest, support_selection, calibration=int(threshold.get("calibration_images", 0)),
            fusion=int(fusion.get("unseen_normals", 0)), seed=int(seed),
        )
        if manifest is not None and support_selection is not None else ([], [])
    )
    rows = _ValidationRows.of(fusion_validation)
    made_from_unseen = bool(rows.unseen.any())
    good = fusion_validation.images[rows.unseen]
    if unseen_paths and not made_from_unseen:
        logger.info("fusion: %d unseen good images of the pool as validation normals", len(unseen_paths))
        good = load_images(unseen_paths, as_hw(image_size), max_pixels=int(data["max_pixels"]))
        outputs = _appended(outputs, score_in_chunks(full, good))
        rows = rows.with_good(np.full(len(good), ORIGINAL_VIEW))
    # Each turned or mirrored view of the labelled defects is compared with the same view of the
    # unseen good images (fit_fusion's ``views``): upright good images alone would credit a
    # scorer that flags any turned image of an aligned part.
    other_views = sorted(set(rows.views[rows.real].tolist()) - {ORIGINAL_VIEW})
    good = good[: int(fusion.get("viewed_normals", 0))]
    if other_views and len(good):
        viewed, names = views_of_good_images(good, SupportAugmentationConfig.from_dict(fusion["defect_views"]), other_views)
        logger.info("fusion: %d unseen good images in the labelled defects' views %s", len(good), other_views)
        outputs = _appended(outputs, score_in_chunks(full, viewed))
        rows = rows.with_good(names)
    options = {key: fusion[key] for key in FUSION_OPTIONS if key in fusion}  # absent: fit_fusion's defaults
    # Whether a scorer's validation normals were kept out of what it was fitted on: the patch
    # scorers score them leave-one-support-out (k >= 2) and a cross-fitted DFD by the member
    # that never saw them; a single DFD model is trained on the supports and WinCLIP takes them
    # as references, so their normals are in-sample and their validation AUROC is optimistic
    # (measured: README, real-data suite).
    held_out = {
        name: made_from_unseen or bool(name in patch_validation and len(support_images) >= 2)
        or (name == "dfd" and dfd_model.cross_fitted)
        for name in outputs
    }
    fitted = fit_fusion(
        outputs,
        rows.labels,
        rows.masks,
        mask_known=rows.mask_known,
        families=rows.families,
        seed=int(seed),
        in_sample=[] if fusion.get("in_sample_alone", False) else [n for n, held in held_out.items() if not held],
        real=rows.real,
        unseen=rows.unseen,
        views=rows.views,
        **options,
    )
    calibration_scores = None
    if calibration:
        full.fusion = fitted
        calibration_scores = fused_scores_of_paths(full, calibration, max_pixels=int(data["max_pixels"]))
    decision = calibrate_decision(
        fitted.fuse(outputs)["pred_score"][: len(fusion_validation.labels)], fusion_validation, calibration_scores,
        method=threshold["method"], target_false_alarm_rate=float(threshold["target_false_alarm_rate"]),
    )
    record = fitted.to_dict()
    record["validation"].update(
        {
            "validation_images": len(fusion_validation.labels),
            "validation_anomalous": int(fusion_validation.labels.sum()),
            "validation_defect_views": int((fusion_validation.defect_shot >= 0).sum()),
            "validation_unseen_normals": int(rows.unseen.sum()),
            "held_out_normals": held_out,
        }
    )
    return {**record, "threshold": decision, "scorers": fitted.scorers}


def _appended(outputs: dict, extra: dict) -> dict:
    """Each scorer's validation outputs followed by its ``extra`` rows."""
    return {name: {key: np.concatenate([outputs[name][key], extra[name][key]]) for key in _OUTPUT_KEYS} for name in outputs}


def calibrate_decision(
    validation_scores: np.ndarray,
    validation: PseudoAnomalySet,
    calibration_scores: np.ndarray | None,
    *,
    method: str,
    target_false_alarm_rate: float,
) -> dict:
    """The deployed threshold, from real images only (the synthetic anomalies never set it).

    Good images: the calibration images of the support pool (``calibration_scores``), else the
    support images themselves as the validation scores them, held out (one row per support).
    ``f1_max`` adds the labelled defect views (real defects, each scored without its own shot)
    as positives; without any it falls back to the target false-alarm rate.
    """
    scores = np.asarray(validation_scores, dtype=np.float64)
    exchangeable = True
    if calibration_scores is not None and len(calibration_scores):
        normals, source = np.asarray(calibration_scores, dtype=np.float64), "support pool (good images never fitted on)"
    else:
        rows = np.flatnonzero(validation.labels == 0)
        if validation.from_unseen[rows].any():
            rows = rows[validation.from_unseen[rows]]
            normals, source = scores[rows], "the validation's unseen good images"
        else:
            _, first = np.unique(validation.source_index[rows], return_index=True)
            normals, source = scores[rows[first]], "held-out supports (one row per support image)"
        # The fusion's normalisation was fitted on these very rows (and with supports, some
        # scorers may have seen them): not exchangeable with new good images, no rate is promised.
        exchangeable = False
    defects = scores[(validation.defect_shot >= 0) & (validation.labels == 1)]
    labels = np.r_[np.zeros(normals.size, int), np.ones(defects.size if method != "target_fpr" else 0, int)]
    values = np.r_[normals, defects if method != "target_fpr" else np.zeros(0)]
    decision = calibrate_threshold(labels, values, method=method, target_false_alarm_rate=target_false_alarm_rate)
    decision.setdefault("target_false_alarm_rate", float(target_false_alarm_rate))
    if not exchangeable:
        decision["expected_false_alarm_rate"] = None
        decision["note"] = (f"no calibration images: the threshold sits above the scores of the {source}, which "
                            "also set the fusion, so no false-alarm rate can be promised (threshold.calibration_images)")
        logger.warning("threshold: %s", decision["note"])
    return {**decision, "calibration_source": source, "exchangeable": exchangeable, "real_defect_views": int(defects.size)}


def score_test_images(
    manifest: pd.DataFrame,
    defect_shots: dict,
    dfd_model: DFDScorer,
    patch_scorers: PatchScorerSet,
    support_images: np.ndarray,
    fusion: dict,
    data: dict,
    scoring: dict,
    winclip: dict,
    image_size: int,
    device: str,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, dict]:
    """Per-image predictions (CSV), fused and per-scorer anomaly maps (.npy), the scoring speed."""
    fitted = Fusion.from_dict(fusion)
    ensemble = _ensemble(dfd_model, patch_scorers, support_images, winclip, image_size, device, fitted)
    test = evaluation_set(manifest, exclude=defect_shot_paths(defect_shots))
    result = score_paths(
        ensemble, test["path"].tolist(), chunk_size=int(scoring["chunk_size"]), max_pixels=int(data["max_pixels"])
    )
    threshold = fusion["threshold"]["threshold"]
    predictions = pd.DataFrame(
        {
            "path": test["path"],
            "gt_label": test["label"].astype(int),
            "defect_type": test["defect_type"],
            "mask_path": test["mask_path"],
            "pred_score": result["pred_scores"],
            "pred_label": (~(result["pred_scores"] < threshold)).astype(int),  # a NaN score is NG
            **{f"score_{name}": values for name, values in result["scorer_scores"].items()},
        }
    )
    timing = {
        "scored_images": len(test),
        "score_seconds": result["seconds"],
        "score_images_per_second": result["images_per_second"],
        "scorers": fitted.scorers,
    }
    return predictions, result["anomaly_maps"], result["scorer_maps"], timing
