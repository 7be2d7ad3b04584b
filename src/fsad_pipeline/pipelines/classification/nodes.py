"""Thin nodes over ``fsad_pipeline.classification.defect_types``."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fsad_pipeline.classification.defect_types import (
    CLASSIFIER,
    DefectTypeClassifiers,
    DefectTypeConfig,
    fit_defect_type_classifiers,
)
from fsad_pipeline.data.geometry import as_hw
from fsad_pipeline.data.sampling import load_images
from fsad_pipeline.evaluation.figures import confusion_matrix_figure
from fsad_pipeline.evaluation.metrics import defect_type_accuracy
from fsad_pipeline.models.defect_classifier import UNKNOWN
from fsad_pipeline.models.features import select_device
from fsad_pipeline.scoring.patch_scorers import PatchScorerSet
from fsad_pipeline.synthesis.textures import TextureBank

logger = logging.getLogger(__name__)

CLASSIFY_MODES = ("flagged", "defects")
#: Images classified per feature extraction in :func:`classify_defect_types`.
CLASSIFY_CHUNK = 32


def fit_defect_classifier(
    support_images: np.ndarray,
    foreground_masks: np.ndarray,
    defect_shots: dict,
    patch_scorers: PatchScorerSet,
    textures: dict,
    classification: dict,
    image_size: int,
    seed: int,
    device: str,
) -> tuple[DefectTypeClassifiers, dict]:
    """Pretrain on pseudo defect classes, fine-tune on the labelled shots; empty without shots."""
    shots = {t: paths for t, paths in defect_shots.get("shots", {}).items() if paths}
    empty = DefectTypeClassifiers(patch_scorers.features, {})
    if not classification["enabled"] or not shots:
        reason = "disabled" if not classification["enabled"] else "no labelled defect shots (k_defect_shots: 0, or no defect images)"
        logger.info("defect-type classification skipped: %s", reason)
        empty.info = {"skipped": reason}
        return empty, empty.info
    paths = [path for t in sorted(shots) for path in shots[t]]
    types = [t for t in sorted(shots) for _ in shots[t]]
    fitted = fit_defect_type_classifiers(
        support_images,
        load_images(paths, as_hw(image_size)),
        types,
        TextureBank.from_parameters(textures),
        patch_scorers.scorers["knn"],
        patch_scorers.features,
        DefectTypeConfig.from_dict(classification),
        foreground_masks=foreground_masks,
        seed=int(seed),
        device=str(select_device(device)),
    )
    return fitted, fitted.info


def classify_defect_types(
    predictions: pd.DataFrame, defect_classifier: DefectTypeClassifiers, classification: dict, image_size: int
) -> pd.DataFrame:
    """Per test image: whether it was classified and every method's type, probability, runner-up.

    ``classify: flagged`` classifies the images the fused score flags (what a line would do);
    ``defects`` every true defect, flagged or not (the classifier on its own, as the benchmark).
    The classifier's columns use the bundle's names, the baselines' carry a ``_<method>`` suffix;
    ``closest_defect_type`` is the nearest prototype even where the type is ``unknown``.
    """
    mode = classification["classify"]
    if mode not in CLASSIFY_MODES:
        raise ValueError(f"classification.classify must be one of {CLASSIFY_MODES}, got {mode!r}")
    chosen = (predictions["pred_label"] if mode == "flagged" else predictions["gt_label"]).astype(int).to_numpy() == 1
    table = pd.DataFrame({"path": predictions["path"], "gt_label": predictions["gt_label"].astype(int),
                          "defect_type": predictions["defect_type"], "pred_label": predictions["pred_label"].astype(int)})
    table["classified"] = chosen & bool(defect_classifier.classifiers)
    for name in defect_classifier.classifiers:
        suffix = "" if name == CLASSIFIER else f"_{name}"
        table[f"pred_defect_type{suffix}"] = ""
        table[f"pred_defect_probability{suffix}"] = np.nan
        table[f"runner_up_defect_type{suffix}"] = ""
        table[f"closest_defect_type{suffix}"] = ""
    rows = np.flatnonzero(table["classified"].to_numpy())
    # In chunks: the patch features of every flagged image at once (~1.6 MB each at 384 x 32 x 32)
    # were the run's peak memory. Each image is classified on its own, so chunks change nothing.
    for start in range(0, rows.size, CLASSIFY_CHUNK):
        chunk = rows[start : start + CLASSIFY_CHUNK]
        features = defect_classifier.image_features(load_images(table["path"].iloc[chunk].tolist(), as_hw(image_size)))
        for name, prediction in defect_classifier.classify(features).items():
            suffix = "" if name == CLASSIFIER else f"_{name}"
            columns = {**prediction.columns(suffix), f"closest_defect_type{suffix}": prediction.closed_set_type}
            for column, values in columns.items():
                table.loc[table.index[chunk], column] = values
    return table


def evaluate_defect_types(defect_types: pd.DataFrame, defect_classifier: DefectTypeClassifiers) -> tuple[dict, Figure]:
    """Accuracy of every method on the classified true defects, and their confusion matrices.

    Closed set (the argmax type) and open set (``unknown`` counts as wrong); flagged normal
    images have no true type, so only how many of them were called ``unknown`` is reported.
    """
    if not defect_classifier.classifiers:
        reason = defect_classifier.info.get("skipped", "no classifier")
        return {"skipped": reason}, confusion_matrix_figure({})
    classified = defect_types[defect_types["classified"].astype(bool)]
    defects = classified[classified["gt_label"] == 1]
    normals = classified[classified["gt_label"] == 0]
    metrics: dict = {"classified_images": int(len(classified)), "classified_defects": int(len(defects)),
                     "class_names": defect_classifier.class_names, "methods": {}}
    confusions = {}
    for name, classifier in defect_classifier.classifiers.items():
        suffix = "" if name == CLASSIFIER else f"_{name}"
        entry: dict = {"unknown_threshold": classifier.unknown_threshold}
        if len(defects):
            open_set = defect_type_accuracy(defects["defect_type"], defects[f"pred_defect_type{suffix}"])
            closed_set = defect_type_accuracy(defects["defect_type"], defects[f"closest_defect_type{suffix}"])
            entry.update(open_set)
            entry.update({"closed_set_accuracy": closed_set["accuracy"],
                          "closed_set_mean_type_accuracy": closed_set["mean_type_accuracy"],
                          "closed_set_per_type": closed_set["per_type"]})
            confusions[name] = open_set["confusion"]
        if len(normals):
            entry["false_alarms_unknown_rate"] = float((normals[f"pred_defect_type{suffix}"] == UNKNOWN).mean())
        metrics["methods"][name] = entry
    metrics.update({k: metrics["methods"][CLASSIFIER].get(k) for k in ("accuracy", "mean_type_accuracy", "unknown_rate")})
    return metrics, confusion_matrix_figure(confusions)
