"""Tests for fsad_pipeline.evaluation.figures."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.figure import Figure

from fsad_pipeline.evaluation.figures import (
    heatmap_overlay_image,
    heatmap_overlay_grid,
    metric_bar_figure,
    pr_figure,
    pseudo_anomaly_examples_figure,
    roc_figure,
    score_histogram_figure,
)


def _render(fig: Figure) -> None:
    assert isinstance(fig, Figure)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    assert buffer.getvalue().startswith(b"\x89PNG")


@pytest.fixture
def labels_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    scores = rng.random(40) + 0.5 * labels
    return labels, scores


@pytest.fixture
def images_maps_masks():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    maps = rng.random((5, 8, 8)).astype(np.float32)  # smaller than the images
    masks = np.zeros((5, 32, 32), dtype=np.float32)
    masks[:, 10:20, 10:20] = 1
    masks[1] = 0  # an empty mask must not break the contour
    return images, maps, masks


def _legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_roc_figure_single_and_multiple_curves(labels_scores):
    labels, scores = labels_scores
    fig = roc_figure(labels, scores, title="ROC")
    assert len(fig.axes) == 1
    assert any("AUROC=" in text for text in _legend_texts(fig))
    _render(fig)
    fig = roc_figure(curves={"a": (labels, scores), "b": (labels, -scores)})
    texts = _legend_texts(fig)
    assert any(t.startswith("a (AUROC=") for t in texts) and any(t.startswith("b (") for t in texts)
    _render(fig)


def test_roc_and_pr_figure_single_class():
    for make in (roc_figure, pr_figure):
        fig = make([0, 0, 0], [0.1, 0.2, 0.3])
        assert len(fig.axes) == 1
        assert any("undefined" in text for text in _legend_texts(fig))
        _render(fig)


def test_pr_figure(labels_scores):
    labels, scores = labels_scores
    fig = pr_figure(labels, scores, curves={"other": (labels, scores[::-1])})
    assert len(fig.axes) == 1
    assert sum("AP=" in text for text in _legend_texts(fig)) == 2
    _render(fig)


def test_score_histogram_variants(labels_scores):
    labels, scores = labels_scores
    fig = score_histogram_figure(scores, labels, threshold=0.7, bins=10)
    assert len(fig.axes) == 1
    assert any("threshold" in text for text in _legend_texts(fig))
    _render(fig)
    types = np.where(labels == 0, "good", np.where(scores > 1.0, "scratch", "dent"))
    fig = score_histogram_figure(scores, labels, defect_types=types)
    assert len(_legend_texts(fig)) == 3
    _render(fig)
    _render(score_histogram_figure([0.5, 0.5], [0, 0]))  # single class, constant scores
    _render(score_histogram_figure([], []))


@pytest.mark.parametrize("with_masks", [True, False])
def test_heatmap_overlay_grid(images_maps_masks, with_masks):
    images, maps, masks = images_maps_masks
    fig = heatmap_overlay_grid(
        images, maps, gt_masks=masks if with_masks else None, titles=["a", "b"], n_max=16
    )
    assert len(fig.axes) == 5 * (3 if with_masks else 2)
    _render(fig)


def test_heatmap_overlay_grid_n_max_grey_and_empty(images_maps_masks):
    images, maps, masks = images_maps_masks
    fig = heatmap_overlay_grid(images, maps, gt_masks=masks, n_max=2, vmin=0.0, vmax=1.0)
    assert len(fig.axes) == 6
    _render(fig)
    grey = [images[0, ..., 0]]
    _render(heatmap_overlay_grid(grey, [maps[0][None]]))
    _render(heatmap_overlay_grid([], []))


@pytest.mark.parametrize("with_normals", [True, False])
def test_pseudo_anomaly_examples_figure(images_maps_masks, with_normals):
    images, _, masks = images_maps_masks
    normals = images[::-1] if with_normals else None
    fig = pseudo_anomaly_examples_figure(images, masks[:, ::2, ::2], [1, 0, 1, 1, 0],
                                         normals=normals, n_max=8)
    assert len(fig.axes) == 5 * (4 if with_normals else 3)
    _render(fig)
    fig = pseudo_anomaly_examples_figure(images, masks, [1] * 5, n_max=2)
    assert len(fig.axes) == 2 * 3


def test_metric_bar_figure():
    fig = metric_bar_figure({"knn": 0.91, "mahalanobis": 0.87, "broken": float("nan")},
                            title="Image AUROC", ylabel="AUROC")
    assert len(fig.axes) == 1
    assert len(fig.axes[0].patches) == 3
    _render(fig)
    _render(metric_bar_figure({}, title="empty", ylabel=""))


def test_heatmap_overlay_blends_a_fixed_colour_scale():
    image = np.full((16, 16, 3), 128, np.uint8)
    anomaly_map = np.zeros((4, 4), np.float32)  # smaller than the image: resized
    anomaly_map[2:, 2:] = 1.0
    overlay = heatmap_overlay_image(image, anomaly_map, vmin=0.0, vmax=1.0, alpha=0.5)
    assert overlay.shape == (16, 16, 3) and overlay.dtype == np.uint8
    cold, hot = overlay[0, 0].astype(int), overlay[15, 15].astype(int)
    assert cold[2] > cold[0] + 40 and hot[0] > hot[2] + 40  # jet: blue at vmin, red at vmax
    # A fixed scale: the same map value gives the same colour whatever else the map holds.
    other = heatmap_overlay_image(image, np.full((4, 4), 1.0, np.float32), vmin=0.0, vmax=1.0, alpha=0.5)
    np.testing.assert_array_equal(other[15, 15], overlay[15, 15])
    # Without a scale, the map's own range is used; alpha 0 leaves the image untouched.
    np.testing.assert_array_equal(heatmap_overlay_image(image, anomaly_map, alpha=0.0), image)
    grey = heatmap_overlay_image(np.full((8, 8), 0.5, np.float32), np.ones((8, 8)), vmin=0.0, vmax=2.0)
    assert grey.shape == (8, 8, 3)
