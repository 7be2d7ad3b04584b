"""The evaluation of one scored test set: every metric in one JSON-ready dict."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fsad_pipeline.evaluation.metrics import (
    aupro,
    f1_max,
    image_auroc,
    per_defect_type_auroc,
    pixel_auroc,
    pr_curve_points,
    roc_curve_points,
)


def _clean(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def evaluate_predictions(
    predictions: pd.DataFrame,
    anomaly_maps: np.ndarray | None = None,
    gt_masks: np.ndarray | None = None,
    has_mask: np.ndarray | None = None,
    *,
    fpr_limit: float = 0.3,
) -> dict:
    """Image metrics always; pixel AUROC and AUPRO when at least one defect image has a mask.

    Defect images without a mask are left out of the pixel metrics (``has_mask`` False).
    ``anomaly_maps`` and ``gt_masks`` are (N, H, W) arrays or per-image sequences whose images
    may differ in size (maps and masks at each image's original resolution, e.g.
    :class:`fsad_pipeline.data.geometry.ResizedMaps`).
    """
    labels = predictions["gt_label"].to_numpy().astype(int)
    scores = predictions["pred_score"].to_numpy().astype(np.float64)
    f1, f1_threshold = f1_max(labels, scores) if labels.max(initial=0) == 1 else (float("nan"), float("nan"))
    predicted = predictions["pred_label"].to_numpy().astype(int)
    metrics = {
        "image_auroc": _clean(image_auroc(labels, scores)),
        "image_auroc_per_defect_type": {
            k: _clean(v) for k, v in per_defect_type_auroc(labels, scores, predictions["defect_type"].to_numpy()).items()
        },
        "f1_max": _clean(f1),
        "f1_max_threshold": _clean(f1_threshold),
        "accuracy_at_threshold": float((predicted == labels).mean()) if len(labels) else None,
        **decision_rates(labels, predicted),
        "n_images": int(len(labels)),
        "n_anomalous": int(labels.sum()),
        "pixel_auroc": None,
        "aupro": None,
    }
    if anomaly_maps is not None and gt_masks is not None:
        keep = np.ones(len(labels), dtype=bool) if has_mask is None else np.asarray(has_mask, dtype=bool)
        if (keep & (labels == 1)).any():
            rows = np.flatnonzero(keep)
            maps = [np.asarray(anomaly_maps[i], dtype=np.float32) for i in rows]
            masks = [gt_masks[i] for i in rows]
            metrics["pixel_auroc"] = _clean(pixel_auroc(masks, maps))
            metrics["aupro"] = _clean(aupro(masks, maps, fpr_limit=fpr_limit))
            metrics["n_images_with_masks"] = int(keep.sum())
    return metrics


def decision_rates(gt_labels: np.ndarray, pred_labels: np.ndarray) -> dict:
    """What the deployed threshold does on a labelled set: the false-alarm rate on good images
    (good flagged NG / good), the miss rate on defects (defects passed OK / defects) and the
    confusion counts. A rate is None when its class is absent."""
    labels = np.asarray(gt_labels).astype(int)
    predicted = np.asarray(pred_labels).astype(int)
    confusion = {
        "true_positive": int(((labels == 1) & (predicted == 1)).sum()),
        "false_positive": int(((labels == 0) & (predicted == 1)).sum()),
        "true_negative": int(((labels == 0) & (predicted == 0)).sum()),
        "false_negative": int(((labels == 1) & (predicted == 0)).sum()),
    }
    good, bad = int((labels == 0).sum()), int((labels == 1).sum())
    return {
        "false_alarm_rate": confusion["false_positive"] / good if good else None,
        "miss_rate": confusion["false_negative"] / bad if bad else None,
        "confusion_at_threshold": confusion,
    }


def curve_points(predictions: pd.DataFrame) -> dict:
    """ROC and PR points of the image scores (for DVC plots and figures)."""
    labels = predictions["gt_label"].to_numpy().astype(int)
    scores = predictions["pred_score"].to_numpy().astype(np.float64)
    return {"roc": roc_curve_points(labels, scores), "pr": pr_curve_points(labels, scores)}


#: Leading columns of the fleet table (in this order, when present); the rest follow by name.
FLEET_COLUMNS = (
    "image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold", "n_images", "n_anomalous",
    "k_shot", "seed", "backbone", "train_seconds", "score_images_per_second",
)


def fleet_metrics_table(metrics_by_category: dict[str, dict]) -> pd.DataFrame:
    """One row per category from each category's ``metrics.json``: the fused scalars, then each
    scorer's image AUROC (``image_auroc_<scorer>``) and the fused AUROC per defect type
    (``image_auroc_type_<type>``; empty where a category has no such type)."""
    rows = []
    for category, metrics in metrics_by_category.items():
        row: dict = {"category": category}
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None})
        for name, scorer in (metrics.get("scorers") or {}).items():
            row[f"image_auroc_{name}"] = scorer.get("image_auroc")
        for defect_type, value in (metrics.get("image_auroc_per_defect_type") or {}).items():
            row[f"image_auroc_type_{defect_type}"] = value
        rows.append(row)
    table = pd.DataFrame(rows)
    leading = ["category", *[c for c in FLEET_COLUMNS if c in table.columns]]
    return table[leading + sorted(c for c in table.columns if c not in leading)]
