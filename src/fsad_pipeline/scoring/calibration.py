"""Decision thresholds, chosen on data the model was not fitted on — never on the test set.

``target_fpr`` (the default): the threshold of a target false-alarm rate on good images. It is
the conformal rule: with ``n`` calibration good images that are exchangeable with the good
images the line will see (same process, never used for fitting), flagging a new image when it
scores above the ``(n - j)``-th smallest calibration score gives an expected false-alarm rate
of exactly ``(j + 1) / (n + 1)``; ``j`` is the largest count for which that is at most the
target. With too few good images for the target (``1 / (n + 1)`` above it) the threshold lies
just above the highest calibration score and the record says what rate to expect instead.

``f1_max``: the threshold of best F1, only meaningful when the labels hold *real* defects (a
synthetic split separates perfectly and gives a threshold that says nothing about real parts:
measured, 92 % false alarms on the default run's good test images). The caller decides which
rows it passes; without an anomalous row it falls back to ``target_fpr``.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from fsad_pipeline.evaluation.metrics import f1_max

logger = logging.getLogger(__name__)

THRESHOLD_METHODS = ("target_fpr", "f1_max")
#: Earlier names of the methods, still accepted (records and configurations written before).
METHOD_ALIASES = {"false_alarm_rate": "target_fpr"}


def threshold_method(name: str) -> str:
    """The canonical method name (aliases resolved), or a ValueError naming the choices."""
    method = METHOD_ALIASES.get(name, name)
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {name!r}")
    return method


def target_fpr_threshold(normal_scores: np.ndarray, target_false_alarm_rate: float = 0.05) -> dict:
    """The conformal target-false-alarm-rate threshold of good images' scores (module docstring).

    Returns ``threshold``, ``expected_false_alarm_rate`` ((j + 1) / (n + 1)), the rate realised on
    the calibration images themselves and their count.
    """
    target = float(target_false_alarm_rate)
    if not 0.0 < target < 1.0:
        raise ValueError(f"target_false_alarm_rate must be in (0, 1), got {target_false_alarm_rate!r}")
    normals = np.sort(np.asarray(normal_scores, dtype=np.float64).reshape(-1))
    if np.isnan(normals).any():
        raise ValueError(f"{int(np.isnan(normals).sum())} calibration score(s) are NaN: the model is broken, no threshold")
    n = int(normals.size)  # +inf counts as a score above every threshold (np.sort puts it last)
    if n == 0:
        raise ValueError("cannot calibrate a threshold without good calibration images")
    exceedances = max(0, int(math.floor(target * (n + 1) + 1e-9)) - 1)  # j: calibration scores allowed above
    exceedances = min(exceedances, n - 1)
    threshold = float(np.nextafter(normals[n - 1 - exceedances], np.inf))
    expected = (exceedances + 1) / (n + 1)
    if expected > target + 1e-12:
        logger.warning(
            "threshold: %d good calibration image(s) cannot resolve a %.1f %% false-alarm rate; expect about "
            "%.1f %% (give more good images: threshold.calibration_images)", n, 100 * target, 100 * expected,
        )
    return {
        "threshold": threshold,
        "target_false_alarm_rate": target,
        "expected_false_alarm_rate": expected,
        "calibration_false_alarm_rate": float(np.mean(normals >= threshold)),
        "calibration_normals": n,
    }


def calibrate_threshold(
    gt_labels: np.ndarray,
    pred_scores: np.ndarray,
    *,
    method: str = "target_fpr",
    target_false_alarm_rate: float = 0.05,
) -> dict:
    """Pick the score threshold (``pred_label = pred_score >= threshold``) from labelled rows.

    ``target_fpr``: :func:`target_fpr_threshold` of the label-0 rows. ``f1_max``: best F1 over
    the rows, falling back to ``target_fpr`` when they hold one class only. Returns a JSON-ready
    record with the method used and the value.
    """
    labels = np.asarray(gt_labels).astype(int)
    scores = np.asarray(pred_scores, dtype=np.float64)
    method = threshold_method(method)
    if method == "f1_max" and labels.min(initial=1) == 0 and labels.max(initial=0) == 1:
        f1, threshold = f1_max(labels, scores)
        normals = scores[labels == 0]
        return {
            "method": "f1_max",
            "threshold": float(threshold),
            "validation_f1": float(f1),
            "calibration_false_alarm_rate": float(np.mean(normals >= threshold)),
            "calibration_normals": int(normals.size),
        }
    if method == "f1_max":
        logger.warning("threshold: no anomalous rows for F1: falling back to the target false-alarm rate")
    return {"method": "target_fpr", **target_fpr_threshold(scores[labels == 0], target_false_alarm_rate)}
