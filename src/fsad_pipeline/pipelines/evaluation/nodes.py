"""Thin nodes over ``fsad_pipeline.evaluation``."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fsad_pipeline.data.geometry import ResizedMaps, as_hw
from fsad_pipeline.data.sampling import load_gt_masks, load_images, load_native_gt_masks
from fsad_pipeline.evaluation.figures import (
    confusion_matrix_figure,
    heatmap_overlay_grid,
    metric_bar_figure,
    pr_figure,
    roc_figure,
    score_histogram_figure,
)
from fsad_pipeline.evaluation.html_report import render_html_report
from fsad_pipeline.evaluation.report import curve_points, evaluate_predictions
from fsad_pipeline.model_store.bundle import CLASSIFIER_COLUMNS
from fsad_pipeline.scoring.dfd_scorer import DFDScorer
from fsad_pipeline.scoring.fusion import Fusion
from fsad_pipeline.scoring.fusion import fusion_summary


def _scorer_predictions(predictions: pd.DataFrame, name: str) -> pd.DataFrame:
    return predictions.assign(pred_score=predictions[f"score_{name}"])


def compute_metrics(
    predictions: pd.DataFrame,
    anomaly_maps: np.ndarray,
    scorer_maps: np.ndarray,
    fusion: dict,
    dfd_model: DFDScorer,
    scoring_timing: dict,
    defect_type_metrics: dict,
    image_size: int,
    k_shot: int,
    k_defect_shots: int,
    seed: int,
    evaluation: dict,
    mask_threshold: int = 0,
) -> tuple[dict, pd.DataFrame]:
    """metrics.json: the fused result at the top level, every scorer under ``scorers``."""
    # Pixel metrics at each image's own resolution: masks read at native size, maps upsampled to them.
    masks, has_mask = load_native_gt_masks(
        predictions["path"].tolist(), predictions["mask_path"].tolist(), predictions["gt_label"].tolist(),
        max_side=evaluation.get("pixel_max_side"), threshold=int(mask_threshold),
    )
    sizes = [mask.shape for mask in masks]
    limit = float(evaluation["aupro_fpr_limit"])
    metrics = evaluate_predictions(predictions, ResizedMaps(anomaly_maps, sizes), masks, has_mask, fpr_limit=limit)
    scorers = {}
    for index, name in enumerate(fusion["scorers"]):
        single = evaluate_predictions(_scorer_predictions(predictions, name), ResizedMaps(scorer_maps[index], sizes), masks, has_mask, fpr_limit=limit)
        scorers[name] = {k: single[k] for k in ("image_auroc", "image_auroc_per_defect_type", "pixel_auroc", "aupro", "f1_max")}
    metrics.update(
        {
            "scorers": scorers,
            **fusion_summary(fusion),
            "threshold": fusion["threshold"]["threshold"],
            "threshold_method": fusion["threshold"]["method"],
            "threshold_calibration": fusion["threshold"],
            "k_shot": int(k_shot),
            "k_defect_shots": int(k_defect_shots),
            "seed": int(seed),
            "backbone": dfd_model.features.backbone,
            "image_size": list(as_hw(image_size)),
            "embedding_dim": dfd_model.features.target_dim,
            "train_seconds": dfd_model.info.get("train_seconds"),
            "best_meta_epoch": dfd_model.info.get("best_meta_epoch"),
            "dfd_path_weights": dfd_model.info.get("path_weights"),  # (Perlin, Gaussian) for the map and the image score
            "score_images_per_second": scoring_timing["score_images_per_second"],
            "score_seconds": scoring_timing["score_seconds"],
            "defect_type": defect_type_metrics,
        }
    )
    roc = curve_points(predictions)["roc"]
    roc_table = pd.DataFrame({"fpr": roc["fpr"], "tpr": roc["tpr"], "threshold": roc["thresholds"]})
    return metrics, roc_table


def _score_figures(predictions: pd.DataFrame, fusion: dict) -> dict[str, Figure]:
    """ROC and PR curves (fused and every scorer) and the score histogram."""
    labels = predictions["gt_label"].to_numpy()
    scores = predictions["pred_score"].to_numpy()
    curves = {"fused": (labels, scores)}
    curves.update({name: (labels, predictions[f"score_{name}"].to_numpy()) for name in fusion["scorers"]})
    return {
        "ROC curve": roc_figure(title="Image-level ROC per scorer", curves=curves),
        "Precision-recall curve": pr_figure(title="Image-level precision-recall per scorer", curves=curves),
        "Score histogram": score_histogram_figure(
            scores, labels, threshold=fusion["threshold"]["threshold"], defect_types=predictions["defect_type"].to_numpy()
        ),
    }


def plot_results(
    predictions: pd.DataFrame,
    anomaly_maps: np.ndarray,
    fusion: dict,
    image_size: int,
    evaluation: dict,
    mask_threshold: int = 0,
) -> tuple[Figure, Figure, Figure, Figure]:
    figures = _score_figures(predictions, fusion)
    scores = predictions["pred_score"].to_numpy()
    # The most anomalous images first, then the least anomalous ones, to see both ends.
    n = int(evaluation["n_overlays"])
    order = np.argsort(-scores)
    chosen = np.concatenate([order[: n - n // 4], order[::-1][: n // 4]]) if len(order) > n else order
    chosen = list(dict.fromkeys(chosen.tolist()))
    rows = predictions.iloc[chosen]
    images = load_images(rows["path"].tolist(), as_hw(image_size))
    masks, _ = load_gt_masks(rows["mask_path"].tolist(), rows["gt_label"].tolist(), as_hw(image_size),
                             threshold=int(mask_threshold))
    titles = [f"{r.defect_type} score={r.pred_score:.2f} {'NG' if r.pred_label else 'OK'}" for r in rows.itertuples()]
    overlays = heatmap_overlay_grid(
        images,
        np.asarray(anomaly_maps[chosen], dtype=np.float32),
        gt_masks=masks if (rows["mask_path"] != "").any() else None,
        titles=titles,
        n_max=n,
        **dict(zip(("vmin", "vmax"), Fusion.from_dict(fusion).map_display_range())),
        per_row=int(evaluation["overlays_per_row"]),
    )
    return figures["ROC curve"], figures["Precision-recall curve"], figures["Score histogram"], overlays


def plot_scorer_comparison(metrics: dict) -> Figure:
    """Test image AUROC per scorer, each next to its validation AUROC ("val") when recorded."""
    validation = metrics.get("validation") or {}
    recorded = {"fused": validation.get("fused") or {}, **(validation.get("scorers") or {})}
    tested = {"fused": metrics["image_auroc"], **{name: m["image_auroc"] for name, m in metrics["scorers"].items()}}
    values = {}
    for name, value in tested.items():
        values[name] = value
        if "image_auroc" in recorded.get(name, {}):
            values[f"{name} val"] = recorded[name]["image_auroc"]
    with_validation = len(values) > len(tested)
    return metric_bar_figure(
        {k: float("nan") if v is None else v for k, v in values.items()},
        title="Image AUROC per scorer (test set" + (", val = synthetic validation)" if with_validation else ")"),
        ylabel="image AUROC",
    )


def with_defect_types(predictions: pd.DataFrame, defect_types: pd.DataFrame) -> pd.DataFrame:
    """``predictions`` plus the classifier's type, probability and runner-up (empty where not classified)."""
    columns = [c for c in CLASSIFIER_COLUMNS if c in defect_types]
    if not columns:
        return predictions
    return predictions.merge(defect_types[["path", *columns]], on="path", how="left", validate="one_to_one")


def write_html_report(
    predictions: pd.DataFrame,
    anomaly_maps: np.ndarray,
    metrics: dict,
    fusion: dict,
    defect_types: pd.DataFrame,
    defect_type_metrics: dict,
    image_size: int,
    evaluation: dict,
) -> str:
    """report.html: metrics, the score figures and every test image ranked by score, in one file.

    The figures are drawn again here (cheap) because the PNG datasets above are write-only.
    """
    predictions = with_defect_types(predictions, defect_types)
    figures = {**_score_figures(predictions, fusion), "Image AUROC per scorer": plot_scorer_comparison(metrics)}
    confusions = {name: m["confusion"] for name, m in (defect_type_metrics.get("methods") or {}).items() if "confusion" in m}
    if confusions:
        figures["Defect-type confusion (flagged defects)"] = confusion_matrix_figure(confusions)
    report = evaluation["html_report"]
    return render_html_report(
        predictions,
        anomaly_maps,
        image_size=as_hw(image_size),
        metrics=metrics,
        figures=figures,
        title=report["title"],
        map_range=Fusion.from_dict(fusion).map_display_range(),
        thumbnail_size=int(report["thumbnail_size"]),
        jpeg_quality=int(report["jpeg_quality"]),
    )
