"""Thin nodes over ``fsad_pipeline.evaluation``."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fsad_pipeline.data.sampling import load_gt_masks, load_images
from fsad_pipeline.evaluation.figures import heatmap_overlay_grid, roc_figure, score_histogram_figure
from fsad_pipeline.evaluation.report import curve_points, evaluate_predictions
from fsad_pipeline.scoring.dfd_scorer import DFDScorer


def compute_metrics(
    predictions: pd.DataFrame,
    anomaly_maps: np.ndarray,
    dfd_model: DFDScorer,
    scoring_timing: dict,
    image_size: int,
    k_shot: int,
    seed: int,
    evaluation: dict,
) -> tuple[dict, pd.DataFrame]:
    masks, has_mask = load_gt_masks(predictions["mask_path"].tolist(), predictions["gt_label"].tolist(), int(image_size))
    metrics = evaluate_predictions(predictions, anomaly_maps, masks, has_mask, fpr_limit=float(evaluation["aupro_fpr_limit"]))
    metrics.update(
        {
            "threshold": dfd_model.threshold["threshold"],
            "threshold_method": dfd_model.threshold["method"],
            "k_shot": int(k_shot),
            "seed": int(seed),
            "backbone": dfd_model.features.backbone,
            "image_size": int(image_size),
            "embedding_dim": dfd_model.features.target_dim,
            "train_seconds": dfd_model.info.get("train_seconds"),
            "best_meta_epoch": dfd_model.info.get("best_meta_epoch"),
            "score_images_per_second": scoring_timing["score_images_per_second"],
            "score_seconds": scoring_timing["score_seconds"],
        }
    )
    roc = curve_points(predictions)["roc"]
    roc_table = pd.DataFrame({"fpr": roc["fpr"], "tpr": roc["tpr"], "threshold": roc["thresholds"]})
    return metrics, roc_table


def plot_results(
    predictions: pd.DataFrame, anomaly_maps: np.ndarray, dfd_model: DFDScorer, image_size: int, evaluation: dict
) -> tuple[Figure, Figure, Figure]:
    labels = predictions["gt_label"].to_numpy()
    scores = predictions["pred_score"].to_numpy()
    roc = roc_figure(labels, scores, title="DFD image-level ROC")
    histogram = score_histogram_figure(
        scores, labels, threshold=dfd_model.threshold["threshold"], defect_types=predictions["defect_type"].to_numpy()
    )
    # The most anomalous images first, then the least anomalous normals, to see both ends.
    n = int(evaluation["n_overlays"])
    order = np.argsort(-scores)
    chosen = np.concatenate([order[: n - n // 4], order[::-1][: n // 4]]) if len(order) > n else order
    chosen = list(dict.fromkeys(chosen.tolist()))
    rows = predictions.iloc[chosen]
    images = load_images(rows["path"].tolist(), int(image_size))
    masks, has_mask = load_gt_masks(rows["mask_path"].tolist(), rows["gt_label"].tolist(), int(image_size))
    titles = [
        f"{r.defect_type} score={r.pred_score:.2f} {'NG' if r.pred_label else 'OK'}" for r in rows.itertuples()
    ]
    overlays = heatmap_overlay_grid(
        images,
        np.asarray(anomaly_maps[chosen], dtype=np.float32),
        gt_masks=masks if has_mask.any() and (rows["mask_path"] != "").any() else None,
        titles=titles,
        n_max=n,
        vmin=0.0,
        vmax=max(1.0, float(np.max(scores))),
        per_row=int(evaluation["overlays_per_row"]),
    )
    return roc, histogram, overlays
