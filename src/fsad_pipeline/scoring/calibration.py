"""Decision thresholds chosen on the synthetic validation split — never on the test set."""

from __future__ import annotations

import logging

import numpy as np

from fsad_pipeline.evaluation.metrics import f1_max

logger = logging.getLogger(__name__)

THRESHOLD_METHODS = ("f1_max", "false_alarm_rate")


def calibrate_threshold(
    gt_labels: np.ndarray,
    pred_scores: np.ndarray,
    *,
    method: str = "f1_max",
    target_false_alarm_rate: float = 0.05,
) -> dict:
    """Pick the score threshold (``pred_label = pred_score >= threshold``).

    ``f1_max``: the threshold of best F1 on the validation labels. ``false_alarm_rate``: the
    lowest threshold that flags at most ``target_false_alarm_rate`` of the normal validation
    images. Returns a JSON-ready record with the method and the value.
    """
    labels = np.asarray(gt_labels).astype(int)
    scores = np.asarray(pred_scores, dtype=np.float64)
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {method!r}")
    normals = np.sort(scores[labels == 0])
    if method == "f1_max" and labels.min(initial=1) == 0 and labels.max(initial=0) == 1:
        f1, threshold = f1_max(labels, scores)
        return {"method": "f1_max", "threshold": float(threshold), "validation_f1": float(f1)}
    if method == "f1_max":
        logger.warning("validation split has a single class: falling back to a false-alarm-rate threshold")
    if normals.size == 0:
        raise ValueError("cannot calibrate a threshold without normal validation images")
    # Smallest threshold with at most the target fraction of normals at or above it.
    allowed = int(np.floor(target_false_alarm_rate * normals.size))
    threshold = float(np.nextafter(normals[normals.size - 1 - allowed], np.inf)) if allowed < normals.size else float(normals[0])
    realised = float(np.mean(normals >= threshold))
    return {
        "method": "false_alarm_rate",
        "threshold": threshold,
        "target_false_alarm_rate": float(target_false_alarm_rate),
        "validation_false_alarm_rate": realised,
    }
