"""Tests for fsad_pipeline.evaluation.metrics."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from skimage.measure import label as connected_components
from sklearn.metrics import f1_score, roc_auc_score

from fsad_pipeline.evaluation.metrics import (
    aupro,
    f1_max,
    image_auroc,
    per_defect_type_auroc,
    pixel_auroc,
    pr_curve_points,
    pro_curve,
    rank_auroc,
    roc_curve_points,
)


# --------------------------------------------------------------------------- #
# fixtures / reference implementation
# --------------------------------------------------------------------------- #
def _random_masks_and_maps(seed: int, n_images: int = 4, size: int = 16):
    """Blob-like GT masks and tie-heavy maps correlated with them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), dtype=np.float32)
    for mask in masks:
        for _ in range(rng.integers(0, 3)):
            r, c = rng.integers(0, size - 4, size=2)
            h, w = rng.integers(1, 5, size=2)
            mask[r : r + h, c : c + w] = 1.0
    maps = np.round(rng.random(masks.shape) + 0.6 * masks, 2).astype(np.float32)
    masks[0, 0, 0] = 1.0  # make sure at least one region exists
    return masks, maps


def _brute_force_aupro(masks, maps, fpr_limit=0.3):
    """Loop over all distinct thresholds, images and regions (slow, obvious)."""
    thresholds = np.unique(maps)[::-1]
    labelled = [connected_components(m > 0.5, connectivity=2) for m in masks]
    n_negative = sum(int((m <= 0.5).sum()) for m in masks)
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        overlaps, false_positives = [], 0
        for mask, amap, regions in zip(masks, maps, labelled):
            predicted = amap >= t
            false_positives += int((predicted & (mask <= 0.5)).sum())
            for region_id in range(1, regions.max() + 1):
                region = regions == region_id
                overlaps.append(predicted[region].sum() / region.sum())
        fprs.append(false_positives / n_negative)
        pros.append(float(np.mean(overlaps)))
    fprs, pros = np.array(fprs), np.array(pros)
    # cut at the limit with linear interpolation
    keep = fprs <= fpr_limit
    x, y = list(fprs[keep]), list(pros[keep])
    if x[-1] < fpr_limit:
        i = int(np.argmax(fprs > fpr_limit))
        y_lim = pros[i - 1] + (pros[i] - pros[i - 1]) * (fpr_limit - fprs[i - 1]) / (fprs[i] - fprs[i - 1])
        x.append(fpr_limit)
        y.append(y_lim)
    return float(np.trapezoid(y, x) / fpr_limit)


# --------------------------------------------------------------------------- #
# image level
# --------------------------------------------------------------------------- #
def test_image_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.random(50) + 0.3 * labels, 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_auroc_is_sklearns_statistic_ties_included(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(2000) < 0.2
    values = rng.integers(0, 30, 2000).astype(np.float32)  # many ties
    assert rank_auroc(labels, values) == pytest.approx(roc_auc_score(labels, values), abs=1e-12)
    assert image_auroc(labels.astype(int) * 2, values) == pytest.approx(roc_auc_score(labels, values), abs=1e-12)
    assert math.isnan(rank_auroc(np.zeros(5, bool), np.arange(5.0)))


def test_image_auroc_single_class_is_nan_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        value = image_auroc([1, 1, 1], [0.2, 0.5, 0.9])
    assert math.isnan(value)
    assert "one class" in caplog.text


def test_f1_max_hand_computed():
    labels = [0, 0, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8]
    best_f1, threshold = f1_max(labels, scores)
    assert best_f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)
    predicted = (np.asarray(scores) >= threshold).astype(int)
    assert f1_score(labels, predicted) == pytest.approx(best_f1)


def test_f1_max_without_anomalies_is_nan():
    best_f1, threshold = f1_max([0, 0], [0.1, 0.2])
    assert math.isnan(best_f1) and math.isnan(threshold)


def test_curve_points_are_json_serialisable_and_finite():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 30)
    scores = rng.random(30)
    roc = roc_curve_points(labels, scores)
    pr = pr_curve_points(labels, scores)
    json.dumps(roc, allow_nan=False)
    json.dumps(pr, allow_nan=False)
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["thresholds"])
    assert len(pr["precision"]) == len(pr["recall"]) == len(pr["thresholds"])
    assert roc["thresholds"][0] > scores.max()
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    assert pr["recall"][-1] == 0.0 and pr["precision"][-1] == 1.0


def test_curve_points_single_class_are_empty():
    assert roc_curve_points([0, 0], [0.1, 0.3]) == {"fpr": [], "tpr": [], "thresholds": []}
    assert pr_curve_points([0, 0], [0.1, 0.3])["precision"] == []


def test_per_defect_type_auroc_hand_computed():
    labels = [0, 0, 1, 1, 1]
    scores = [0.1, 0.2, 0.9, 0.15, 0.05]
    types = ["good", "good", "scratch", "scratch", "dent"]
    result = per_defect_type_auroc(labels, scores, types)
    assert result == {"dent": pytest.approx(0.0), "scratch": pytest.approx(0.75)}


# --------------------------------------------------------------------------- #
# pixel AUROC
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_equals_sklearn_with_ties(seed):
    masks, maps = _random_masks_and_maps(seed, n_images=5, size=20)
    expected = roc_auc_score(masks.ravel() > 0.5, maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_accepts_lists_channel_axes_and_soft_masks():
    rng = np.random.default_rng(3)
    masks = [rng.random((8, 8)) * 0.9 + 0.05, rng.random((1, 6, 10))]
    maps = [np.round(rng.random((8, 8)), 1), np.round(rng.random((6, 10, 1)), 1)]
    flat_masks = np.r_[masks[0].ravel(), masks[1].ravel()] > 0.5
    flat_maps = np.r_[maps[0].ravel(), maps[1].ravel()]
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(flat_masks, flat_maps))
    assert pixel_auroc(np.asarray(masks[0])[None, None], np.asarray(maps[0])[None, None]) == (
        pytest.approx(roc_auc_score(masks[0].ravel() > 0.5, maps[0].ravel()))
    )


def test_pixel_auroc_single_class_is_nan():
    assert math.isnan(pixel_auroc(np.zeros((2, 4, 4)), np.ones((2, 4, 4))))


def test_pixel_auroc_shape_mismatch_raises():
    with pytest.raises(ValueError):
        pixel_auroc(np.zeros((1, 4, 4)), np.zeros((1, 5, 4)))


# --------------------------------------------------------------------------- #
# AUPRO
# --------------------------------------------------------------------------- #
def test_aupro_perfect_map_is_one():
    masks, _ = _random_masks_and_maps(0)
    assert aupro(masks, masks) == pytest.approx(1.0)


def test_aupro_constant_map_is_half_the_limit():
    # One threshold: the curve jumps from (0, 0) to (1, 1); the area of the
    # diagonal up to the limit is limit**2 / 2, normalised: limit / 2.
    masks, _ = _random_masks_and_maps(1)
    for limit in (0.3, 0.5):
        assert aupro(masks, np.full_like(masks, 0.7), fpr_limit=limit) == pytest.approx(limit / 2)


def test_aupro_inverted_map_is_zero():
    masks, _ = _random_masks_and_maps(2)
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0)


def test_aupro_two_regions_one_found_one_missed():
    # Image A: a 2x2 region fully detected above all negatives.
    # Image B: a 3x3 region scored below all negatives.
    # At t=1: FPR=0, PRO=(1+0)/2=0.5 and PRO stays 0.5 until FPR=1 -> AUPRO=0.5
    # (pixel-pooled overlap would give 4/13, so region pooling is checked too).
    masks = np.zeros((2, 8, 8), dtype=np.float32)
    masks[0, 1:3, 1:3] = 1
    masks[1, 4:7, 4:7] = 1
    maps = np.zeros_like(masks)
    maps[0][masks[0] > 0] = 1.0
    maps[1][masks[1] > 0] = -1.0
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_two_regions_missed_region_tied_with_negatives():
    # As above, but the missed region scores 0 like the negatives: the curve is
    # (0,0) -> (0,0.5) -> (1,1); at FPR 0.3 the PRO is 0.65, so the area is
    # 0.3 * (0.5 + 0.65) / 2 and the normalised AUPRO 0.575.
    masks = np.zeros((2, 8, 8), dtype=np.float32)
    masks[0, 1:3, 1:3] = 1
    masks[1, 4:7, 4:7] = 1
    maps = np.where(np.arange(2)[:, None, None] == 0, masks, 0.0)
    assert aupro(masks, maps) == pytest.approx(0.575)


def test_aupro_uses_eight_connectivity():
    # A diagonal line of 3 pixels is ONE region (8-connectivity) with 1/3 found;
    # a 2x2 block is fully found: PRO = (1/3 + 1) / 2 = 2/3 (4-connectivity: 0.5).
    mask = np.zeros((8, 8), dtype=np.float32)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = 1
    mask[5:7, 5:7] = 1
    amap = np.zeros_like(mask)
    amap[mask > 0] = -1.0
    amap[0, 0] = 1.0
    amap[5:7, 5:7] = 1.0
    assert aupro(mask[None], amap[None]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed, limit):
    masks, maps = _random_masks_and_maps(seed)
    expected = _brute_force_aupro(masks, maps, fpr_limit=limit)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)
    assert aupro(masks, maps, fpr_limit=limit, num_thresholds=500) == pytest.approx(
        expected, abs=1e-2
    )


def test_aupro_no_regions_is_nan():
    assert math.isnan(aupro(np.zeros((2, 5, 5)), np.random.default_rng(0).random((2, 5, 5))))


def test_aupro_invalid_limit_raises():
    masks, maps = _random_masks_and_maps(0)
    with pytest.raises(ValueError):
        aupro(masks, maps, fpr_limit=0.0)


def test_pro_curve_is_monotone_and_stops_at_limit():
    masks, maps = _random_masks_and_maps(4)
    fpr, pro = pro_curve(masks, maps, fpr_limit=0.3)
    assert fpr[0] == 0.0 and pro[0] == 0.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    assert fpr[-1] >= 0.3 and np.all(fpr[:-1] < 0.3)
    full_fpr, full_pro = pro_curve(masks, maps, fpr_limit=None)
    assert full_fpr[-1] == pytest.approx(1.0) and full_pro[-1] == pytest.approx(1.0)


def test_metrics_scale_to_many_pixels_quickly():
    # 40 maps of 128x128 (650k pixels): exact pixel AUROC and AUPRO stay fast.
    rng = np.random.default_rng(5)
    masks = np.zeros((40, 128, 128), dtype=np.float32)
    masks[:, 30:60, 40:70] = 1
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    pixel = pixel_auroc(masks, maps)
    assert 0.5 < pixel < 1.0
    assert 0.0 < aupro(masks, maps) < 1.0


def test_decision_rates_at_the_deployed_threshold():
    from fsad_pipeline.evaluation.report import decision_rates

    rates = decision_rates(np.array([0, 0, 0, 0, 1, 1, 1]), np.array([1, 0, 0, 0, 1, 1, 0]))
    assert rates["false_alarm_rate"] == 0.25 and rates["miss_rate"] == pytest.approx(1 / 3)
    assert rates["confusion_at_threshold"] == {"true_positive": 2, "false_positive": 1, "true_negative": 3, "false_negative": 1}
    assert decision_rates(np.array([0, 0]), np.array([0, 1]))["miss_rate"] is None
