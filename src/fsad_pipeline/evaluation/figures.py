"""Evaluation figures, built with matplotlib's object-oriented API.

Every function returns a :class:`matplotlib.figure.Figure` created directly
(no ``pyplot`` global state), so it is thread-safe and needs no display; save
it with ``fig.savefig(path)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from fsad_pipeline.evaluation.metrics import image_auroc

logger = logging.getLogger(__name__)

__all__ = [
    "confusion_matrix_figure",
    "heatmap_overlay_grid",
    "heatmap_overlay_image",
    "metric_bar_figure",
    "pr_figure",
    "pseudo_anomaly_examples_figure",
    "roc_figure",
    "score_histogram_figure",
]

CurveInputs = tuple[Any, Any]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _named_curves(
    gt_labels: Any,
    pred_scores: Any,
    label: str,
    curves: Mapping[str, CurveInputs] | None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    named: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if gt_labels is not None and pred_scores is not None:
        named[label] = (gt_labels, pred_scores)
    for name, (labels, scores) in (curves or {}).items():
        named[name] = (labels, scores)
    return {
        name: (np.asarray(labels).reshape(-1).astype(np.int64), np.asarray(scores, float).reshape(-1))
        for name, (labels, scores) in named.items()
    }


def _to_rgb_uint8(image: Any) -> np.ndarray:
    """Return an ``H×W×3`` uint8 image (grey and float [0, 1] inputs accepted)."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.dtype != np.uint8:
        scale = 255.0 if array.size and float(np.nanmax(array)) <= 1.0 else 1.0
        array = np.clip(array.astype(np.float64) * scale, 0, 255).astype(np.uint8)
    return array


def _to_2d_float(array: Any, height: int, width: int) -> np.ndarray:
    """Squeeze to 2-D float32 and resize (bilinear) to ``height×width`` if needed."""
    values = np.asarray(array, dtype=np.float32)
    while values.ndim > 2 and values.shape[0] == 1:
        values = values[0]
    while values.ndim > 2 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.shape != (height, width):
        values = cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)
    return values


def _image_axes(fig: Figure, n_rows: int, n_cols: int) -> np.ndarray:
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return axes


def _empty_figure(message: str) -> Figure:
    fig = Figure(figsize=(4, 2))
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.set_axis_off()
    return fig


def _draw_contour(ax: Axes, mask: np.ndarray, color: str) -> None:
    binary = mask > 0.5
    if binary.any() and not binary.all():
        ax.contour(binary.astype(np.float32), levels=[0.5], colors=color, linewidths=1.0)


# --------------------------------------------------------------------------- #
# curves
# --------------------------------------------------------------------------- #
def roc_figure(
    gt_labels: Any = None,
    pred_scores: Any = None,
    *,
    title: str = "ROC curve",
    label: str = "scores",
    curves: Mapping[str, CurveInputs] | None = None,
    figsize: tuple[float, float] = (5.0, 5.0),
) -> Figure:
    """ROC curve(s) with the AUROC in the legend.

    ``gt_labels``/``pred_scores`` draw one curve named ``label``; ``curves`` adds
    further named ``(labels, scores)`` pairs (e.g. to compare scorers). Curves with
    a single class are listed in the legend as undefined.
    """
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    for name, (labels, scores) in _named_curves(gt_labels, pred_scores, label, curves).items():
        if np.unique(labels).size < 2:
            ax.plot([], [], label=f"{name} (AUROC undefined: one class)")
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUROC={image_auroc(labels, scores):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


def pr_figure(
    gt_labels: Any = None,
    pred_scores: Any = None,
    *,
    title: str = "Precision-recall curve",
    label: str = "scores",
    curves: Mapping[str, CurveInputs] | None = None,
    figsize: tuple[float, float] = (5.0, 5.0),
) -> Figure:
    """Precision-recall curve(s) with the average precision (AP) in the legend.

    Same inputs as :func:`roc_figure`; the positive rate of the first curve is drawn
    as the chance baseline.
    """
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot()
    named = _named_curves(gt_labels, pred_scores, label, curves)
    for index, (name, (labels, scores)) in enumerate(named.items()):
        if labels.size == 0 or not np.any(labels == 1):
            ax.plot([], [], label=f"{name} (AP undefined: no anomalies)")
            continue
        precision, recall, _ = precision_recall_curve(labels, scores)
        average_precision = average_precision_score(labels, scores)
        ax.plot(recall, precision, label=f"{name} (AP={average_precision:.3f})")
        if index == 0:
            ax.axhline(float(np.mean(labels == 1)), linestyle="--", color="grey",
                       linewidth=0.8, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    return fig


def score_histogram_figure(
    pred_scores: Any,
    gt_labels: Any = None,
    *,
    threshold: float | None = None,
    defect_types: Any = None,
    bins: int = 40,
    title: str = "Anomaly score distribution",
    figsize: tuple[float, float] = (6.0, 4.0),
    alpha: float = 0.5,
) -> Figure:
    """Overlaid score histograms: normal vs anomalous, or one per defect type.

    All groups share the same bin edges; a dashed vertical line marks ``threshold``.
    """
    scores = np.asarray(pred_scores, dtype=float).reshape(-1)
    groups: dict[str, np.ndarray] = {}
    if defect_types is not None:
        types = np.asarray([str(t) for t in np.asarray(defect_types).reshape(-1)])
        for name in sorted(set(types.tolist())):
            groups[name] = scores[types == name]
    elif gt_labels is not None:
        labels = np.asarray(gt_labels).reshape(-1).astype(np.int64)
        groups = {"normal": scores[labels == 0], "anomalous": scores[labels == 1]}
        groups = {name: values for name, values in groups.items() if values.size}
    else:
        groups = {"all": scores}

    fig = Figure(figsize=figsize)
    ax = fig.add_subplot()
    if scores.size:
        low, high = float(scores.min()), float(scores.max())
        if threshold is not None:
            low, high = min(low, threshold), max(high, threshold)
        if high <= low:
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, bins + 1)
        for name, values in groups.items():
            ax.hist(values, bins=edges, alpha=alpha, label=f"{name} (n={values.size})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold={threshold:.3g}")
    ax.set_xlabel("Anomaly score")
    ax.set_ylabel("Count")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- #
# single images
# --------------------------------------------------------------------------- #
# --------------------------------------------------------------------------- #
# image grids
# --------------------------------------------------------------------------- #
def heatmap_overlay_grid(
    images: Sequence[Any],
    anomaly_maps: Sequence[Any],
    *,
    gt_masks: Sequence[Any] | None = None,
    titles: Sequence[str] | None = None,
    n_max: int = 16,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    contour_color: str = "red",
    cell_size: float = 2.5,
    per_row: int = 1,
) -> Figure:
    """Per image: image | heat-map overlay | image with GT contour; ``per_row`` images side by side.

    The GT column is present only with ``gt_masks``. Maps of another size than the
    image are resized bilinearly. ``vmin``/``vmax`` default to the min/max over the
    shown maps, so colours are comparable across rows. At most ``n_max`` rows.
    """
    n_rows = min(len(images), len(anomaly_maps), n_max)
    if n_rows == 0:
        return _empty_figure("no images")
    n_cols = 3 if gt_masks is not None else 2
    rgb_images = [_to_rgb_uint8(images[i]) for i in range(n_rows)]
    maps = [_to_2d_float(anomaly_maps[i], *rgb_images[i].shape[:2]) for i in range(n_rows)]
    low = float(min(m.min() for m in maps)) if vmin is None else vmin
    high = float(max(m.max() for m in maps)) if vmax is None else vmax

    per_row = max(1, min(int(per_row), n_rows))
    grid_rows = math.ceil(n_rows / per_row)
    fig = Figure(figsize=(cell_size * n_cols * per_row, cell_size * grid_rows))
    all_axes = _image_axes(fig, grid_rows, n_cols * per_row)
    for ax in all_axes.ravel()[n_rows * n_cols :]:
        ax.set_axis_off()
    for index in range(n_rows):
        row, offset = divmod(index, per_row)
        axes = all_axes[row, offset * n_cols : (offset + 1) * n_cols]
        image = rgb_images[index]
        axes[0].imshow(image)
        axes[1].imshow(image)
        axes[1].imshow(maps[index], cmap=cmap, alpha=alpha, vmin=low, vmax=high)
        if gt_masks is not None:
            mask = _to_2d_float(gt_masks[index], *image.shape[:2])
            axes[2].imshow(image)
            _draw_contour(axes[2], mask, contour_color)
        title = titles[index] if titles is not None and index < len(titles) else f"#{index}"
        axes[0].set_title(str(title), fontsize="small")
        axes[1].set_title("anomaly map", fontsize="small")
        if gt_masks is not None:
            axes[2].set_title("ground truth", fontsize="small")
    fig.tight_layout()
    return fig


def heatmap_overlay_image(
    image: Any,
    anomaly_map: Any,
    *,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    alpha: float = 0.5,
    size: tuple[int, int] | None = None,
    caption: str | None = None,
    caption_color: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """One image blended with its jet-coloured anomaly map, as a uint8 RGB array (no matplotlib).

    Per-image PNGs for inference need to be cheap, so this draws with OpenCV. ``size`` is the
    output (height, width), e.g. the original aspect ratio of the file; the map is clipped to
    ``[vmin, vmax]`` so colours mean the same in every image (``None``: the map's own min/max).
    ``caption`` is written on a dark band at the top (e.g. ``"NG 0.83"``). Reports, inference
    outputs and the notebook all use this one overlay.
    """
    rgb = _to_rgb_uint8(image)
    height, width = size if size is not None else rgb.shape[:2]
    if rgb.shape[:2] != (height, width):
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    values = _to_2d_float(anomaly_map, height, width)
    low = float(values.min()) if vmin is None else float(vmin)
    high = float(values.max()) if vmax is None else float(vmax)
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    heat = cv2.applyColorMap(np.round(scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(rgb, 1.0 - alpha, heat, alpha, 0.0)
    if caption:
        scale = max(0.35, min(height, width) / 400)
        thickness = max(1, int(round(scale * 2)))
        (text_w, text_h), baseline = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        band = text_h + baseline + 6
        blended[:band] = (blended[:band] * 0.35).astype(np.uint8)
        cv2.putText(blended, caption, (4, text_h + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, caption_color, thickness,
                    cv2.LINE_AA)
    return blended


def pseudo_anomaly_examples_figure(
    images: Sequence[Any],
    masks: Sequence[Any],
    labels: Sequence[Any],
    *,
    normals: Sequence[Any] | None = None,
    n_max: int = 8,
    alpha: float = 0.5,
    cmap: str = "jet",
    cell_size: float = 2.5,
) -> Figure:
    """One row per synthetic example: (normal |) augmented image | mask | overlay.

    The normal column is present only with ``normals``; the label is shown in the
    row title. Masks of another size than the image are resized.
    """
    n_rows = min(len(images), len(masks), n_max)
    if n_rows == 0:
        return _empty_figure("no examples")
    offset = 1 if normals is not None else 0
    n_cols = 3 + offset
    fig = Figure(figsize=(cell_size * n_cols, cell_size * n_rows))
    axes = _image_axes(fig, n_rows, n_cols)
    for row in range(n_rows):
        image = _to_rgb_uint8(images[row])
        mask = _to_2d_float(masks[row], *image.shape[:2])
        label = labels[row] if row < len(labels) else "?"
        if normals is not None:
            axes[row, 0].imshow(_to_rgb_uint8(normals[row]))
            axes[row, 0].set_title("normal", fontsize="small")
        axes[row, offset].imshow(image)
        axes[row, offset].set_title(f"augmented (label={label})", fontsize="small")
        axes[row, offset + 1].imshow(mask, cmap="gray", vmin=0.0, vmax=max(1.0, float(mask.max())))
        axes[row, offset + 1].set_title("mask", fontsize="small")
        axes[row, offset + 2].imshow(image)
        axes[row, offset + 2].imshow(np.ma.masked_less_equal(mask, 0.0), cmap=cmap,
                                     alpha=alpha, vmin=0.0, vmax=1.0)
        axes[row, offset + 2].set_title("overlay", fontsize="small")
    fig.tight_layout()
    return fig


def metric_bar_figure(
    values: Mapping[str, float],
    *,
    title: str = "",
    ylabel: str = "",
    figsize: tuple[float, float] | None = None,
    value_format: str = "{:.3f}",
) -> Figure:
    """Bar chart of named metric values (NaN drawn as an empty bar labelled ``nan``)."""
    names = [str(name) for name in values]
    numbers = [float(v) for v in values.values()]
    width = max(4.0, 0.8 * len(names) + 2.0)
    fig = Figure(figsize=figsize or (width, 4.0))
    ax = fig.add_subplot()
    heights = [0.0 if math.isnan(v) else v for v in numbers]
    bars = ax.bar(range(len(names)), heights)
    for bar, value in zip(bars, numbers):
        text = "nan" if math.isnan(value) else value_format.format(value)
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize="small")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def training_history_figure(history: Sequence[Mapping[str, Any]], *, figsize: tuple[float, float] = (9, 3.5)) -> Figure:
    """Loss and validation AUROC per meta-epoch (one dict per meta-epoch, as ``train_dfd`` writes).

    Records of a cross-fitted DFD carry ``member``: one line per member (its own held-out
    validation)."""
    if not history:
        return _empty_figure("no training history")
    fig = Figure(figsize=figsize)
    loss_ax, auroc_ax = fig.subplots(1, 2)
    members = sorted({int(h.get("member", 0)) for h in history})
    loss_keys = sorted({k for h in history for k, v in h.items() if "loss" in k and isinstance(v, (int, float))})
    for member in members:
        records = [h for h in history if int(h.get("member", 0)) == member]
        epochs = [int(h.get("meta_epoch", i)) for i, h in enumerate(records)]
        suffix = f" (member {member})" if len(members) > 1 else ""
        for key in loss_keys:
            loss_ax.plot(epochs, [h.get(key, float("nan")) for h in records], label=key + suffix)
        for key in ("image_auroc", "pixel_auroc"):
            values = [h.get(f"val_{key}", h.get(key)) for h in records]
            values = [float("nan") if v is None else v for v in values]
            auroc_ax.plot(epochs, values, marker="o", label=f"validation {key}{suffix}")
    loss_ax.set(xlabel="meta-epoch", ylabel="loss", title="training loss")
    if loss_keys:
        loss_ax.legend(fontsize=6)
    title = "synthetic validation" + (" (each member: its held-out supports)" if len(members) > 1 else "")
    auroc_ax.set(xlabel="meta-epoch", ylabel="AUROC", title=title, ylim=(0, 1.02))
    auroc_ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def confusion_matrix_figure(
    confusions: Mapping[str, Mapping[str, Any]], *, figsize: tuple[float, float] | None = None
) -> Figure:
    """One confusion-matrix panel per method (``{"true", "predicted", "matrix"}`` each, see
    :func:`~fsad_pipeline.evaluation.metrics.defect_type_accuracy`), counts and row shares."""
    if not confusions:
        return _empty_figure("no defect-type predictions")
    n = len(confusions)
    size = max(len(c["predicted"]) for c in confusions.values())
    fig = Figure(figsize=figsize or (max(4.0, 1.0 + 0.9 * size) * n, max(3.5, 1.2 + 0.8 * size)))
    for position, (name, confusion) in enumerate(confusions.items(), start=1):
        ax = fig.add_subplot(1, n, position)
        matrix = np.asarray(confusion["matrix"], dtype=float)
        shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1.0)
        ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        for (row, col), count in np.ndenumerate(matrix):
            ax.text(col, row, f"{int(count)}", ha="center", va="center",
                    color="white" if shares[row, col] > 0.6 else "black", fontsize="small")
        ax.set_xticks(range(len(confusion["predicted"])))
        ax.set_xticklabels(confusion["predicted"], rotation=45, ha="right", fontsize="small")
        ax.set_yticks(range(len(confusion["true"])))
        ax.set_yticklabels(confusion["true"], fontsize="small")
        ax.set_xlabel("predicted")
        if position == 1:
            ax.set_ylabel("true")
        correct = np.trace(matrix[:, : len(confusion["true"])]) if matrix.size else 0.0
        ax.set_title(f"{name}  (acc {correct / max(matrix.sum(), 1.0):.2f})", fontsize="medium")
    fig.tight_layout()
    return fig
