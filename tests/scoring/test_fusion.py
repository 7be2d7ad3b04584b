import json

import numpy as np
import pytest

from fsad_pipeline.evaluation.metrics import auroc_standard_error, image_auroc, pixel_auroc
from fsad_pipeline.scoring.fusion import (
    Fusion,
    ScoreStats,
    candidate_weights,
    fit_fusion,
    fusion_summary,
    select_weights,
    weak_scorers,
)

SIZE = 8


def _outputs(scores: np.ndarray, size: int = SIZE) -> dict:
    """Maps equal to the image score everywhere (a scorer whose map carries no localisation)."""
    maps = np.repeat(scores[:, None, None], size * size, axis=1).reshape(len(scores), size, size).astype(np.float32)
    return {"anomaly_map": maps, "pred_score": scores.astype(np.float32)}


def _defect_masks(labels: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Anomalous rows have a defect in their top-left quarter."""
    masks = np.zeros((len(labels), size, size), np.uint8)
    masks[labels == 1, : size // 2, : size // 2] = 1
    return masks


def _localising_maps(masks: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    return (masks + noise * rng.standard_normal(masks.shape)).astype(np.float32)


def test_noise_scorer_gets_no_weight_and_fused_auroc_matches_the_good_scorer():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 30)
    good = labels + 0.6 * rng.standard_normal(60)  # informative but not perfect
    noise = rng.standard_normal(60)
    outputs = {"noise": _outputs(noise), "good": _outputs(good)}
    fitted = fit_fusion(outputs, labels, n_trials=200, seed=0)
    assert fitted.score_weights["noise"] < 0.1 and fitted.score_weights["good"] > 0.9
    fused = image_auroc(labels, fitted.fuse(outputs)["pred_score"])
    assert fused >= image_auroc(labels, good) - 0.005
    report = fitted.validation
    assert report["scorers"]["good"]["image_auroc"] == pytest.approx(image_auroc(labels, good))
    assert report["fused"]["image_auroc"] == pytest.approx(fused)
    assert "min_gain" in fitted.search["scores"]["reason"]


def test_score_and_map_weights_follow_their_own_validation_metric():
    """Scorer A ranks images well but its map does not localise; B localises but its image score is noise."""
    rng = np.random.default_rng(1)
    labels = np.array([0] * 20 + [1] * 20)
    masks = _defect_masks(labels)
    a = _outputs(labels + 0.2 * rng.standard_normal(40))
    a["anomaly_map"] = rng.standard_normal(masks.shape).astype(np.float32)
    b = {"anomaly_map": _localising_maps(masks, rng, 0.3), "pred_score": rng.standard_normal(40).astype(np.float32)}
    fitted = fit_fusion({"a": a, "b": b}, labels, masks, n_trials=50, seed=0)
    assert fitted.score_weights["a"] > 0.9 and fitted.map_weights["b"] > 0.9
    fused = fitted.fuse({"a": a, "b": b})
    assert pixel_auroc(masks, fused["anomaly_map"]) >= pixel_auroc(masks, b["anomaly_map"]) - 0.005
    assert fitted.validation["scorers"]["b"]["pixel_auroc"] > 0.9 > fitted.validation["scorers"]["a"]["pixel_auroc"]


def test_normal_only_normalisation_maps_held_out_normals_to_zero_one():
    """Statement: after normalisation the normals' median is 0 and their ``normal_quantile``
    quantile is 1 (so at least that fraction of them lies at or below 1); with fewer normals than
    the quantile resolves (n·(1−q) < 1) their maximum is 1. Anomalies do not move the scale."""
    rng = np.random.default_rng(2)
    many, few = rng.gamma(2.0, 1.0, 200), rng.gamma(2.0, 1.0, 6)
    for normals in (many, few):
        anomalies = np.array([50.0, 1e4])  # an extreme anomaly must not squeeze the normals
        scores = np.r_[normals, anomalies]
        labels = np.r_[np.zeros(normals.size), np.ones(2)].astype(int)
        maps = np.repeat(scores[:, None, None], 4, axis=1).reshape(-1, 2, 2)
        stats = ScoreStats.from_normals(maps, scores, labels == 0, normal_quantile=0.95, normal_pixel_quantile=0.95)
        normalised = stats.normalise_scores(scores)[labels == 0]
        assert np.median(normalised) == pytest.approx(0.0, abs=1e-12)
        if normals.size * 0.05 >= 1:
            assert np.quantile(normalised, 0.95) == pytest.approx(1.0)
            assert np.mean(normalised <= 1.0 + 1e-9) >= 0.95
        else:
            assert normalised.max() == pytest.approx(1.0)
        # Too few normals for the score quantile: the score scale is the normal pixels' (here the
        # same values, so the same scale).
        few = normals.size * 0.05 < 1
        assert stats.sources == {"map": "normals", "score": "normal_pixels" if few else "normals"}
        assert stats.normalise_scores(anomalies)[0] > 1.0
        np.testing.assert_allclose(stats.normalise_maps(maps)[:, 0, 0], stats.normalise_scores(scores), rtol=1e-5, atol=1e-5)


def test_constant_scorer_falls_back_to_all_rows_then_unit_scale():
    labels = np.array([0, 0, 0, 1])
    scores = np.array([2.0, 2.0, 2.0, 6.0])
    maps = np.zeros((4, 2, 2), np.float32)
    stats = ScoreStats.from_normals(maps, scores, labels == 0)
    assert (stats.score_scale, stats.sources["score"]) == (4.0, "all_rows")
    assert (stats.map_scale, stats.sources["map"]) == (1.0, "unit")
    assert np.isfinite(stats.normalise_scores(scores)).all() and np.isfinite(stats.normalise_maps(maps)).all()


def test_saturated_validation_picks_one_scorer_by_separation():
    """Every scorer separates perfectly: the simplest candidate (one scorer) wins, the one whose
    anomalies lie farthest above the normals' spread."""
    rng = np.random.default_rng(3)
    labels = np.array([0] * 20 + [1] * 10)
    normals = rng.uniform(0, 1, 20)
    near = np.r_[normals, 1.5 + rng.uniform(0, 0.1, 10)]
    far = np.r_[normals[::-1], 10.0 + rng.uniform(0, 0.1, 10)]
    fitted = fit_fusion({"near": _outputs(near), "far": _outputs(far)}, labels, n_trials=20, seed=0)
    assert fitted.score_weights == {"near": 0.0, "far": 1.0}
    assert fitted.search["scores"]["method"] == "subset"
    assert "separation" in fitted.search["scores"]["reason"]


def test_a_more_complex_candidate_needs_min_gain():
    vectors, monte_carlo = candidate_weights(2, 3, seed=0)
    assert vectors.shape == (3 + 3, 2) and monte_carlo.tolist() == [False] * 3 + [True] * 3
    np.testing.assert_allclose(vectors.sum(axis=1), 1.0)
    separations = np.zeros(len(vectors))
    objectives = np.array([0.89, 0.80, 0.903, 0.95, 0.5, 0.5])  # one-hot a, one-hot b, equal, Monte-Carlo...
    assert select_weights(vectors, monte_carlo, objectives, separations, min_gain=0.1)[0] == 0
    assert select_weights(vectors, monte_carlo, objectives, separations, min_gain=0.01)[0] == 3
    assert select_weights(vectors, monte_carlo, objectives, separations, min_gain=0.0)[0] == 3
    objectives[3] = 0.904  # within 0.005 of equal (0.903) -> equal weights, the simpler of the two
    assert select_weights(vectors, monte_carlo, objectives, separations, min_gain=0.005)[0] == 2


def test_the_ensemble_preference_keeps_every_scorer_within_the_margin():
    vectors, monte_carlo = candidate_weights(2, 0, seed=0)  # one-hot a, one-hot b, equal
    separations = np.zeros(len(vectors))
    near_tie = np.array([0.826, 0.823, 0.828])  # metal_plate's validation, the pair best by 0.002
    assert select_weights(vectors, monte_carlo, near_tie, separations, 0.005)[0] == 0  # simplest: a alone
    chosen, reason = select_weights(vectors, monte_carlo, near_tie, separations, 0.05, "ensemble", "its standard error")
    assert chosen == 2 and "most scorers" in reason and "its standard error" in reason
    clear = np.array([0.866, 0.574, 0.70])  # textile's: the pair far below DFD alone
    assert select_weights(vectors, monte_carlo, clear, separations, 0.05, "ensemble")[0] == 0
    with pytest.raises(ValueError, match="prefer"):
        select_weights(vectors, monte_carlo, clear, separations, 0.05, "largest")


def test_auroc_standard_error_is_hanley_mcneil():
    # Hanley & McNeil (1982), the exponential approximation, by hand at A = 0.8, 10 / 20 samples.
    q1, q2 = 0.8 / 1.2, 2 * 0.64 / 1.8
    expected = np.sqrt((0.8 * 0.2 + 9 * (q1 - 0.64) + 19 * (q2 - 0.64)) / 200)
    assert auroc_standard_error(0.8, 10, 20) == pytest.approx(expected)
    assert auroc_standard_error(0.8, 40, 80) < auroc_standard_error(0.8, 10, 20)
    assert auroc_standard_error(1.0, 10, 20) == 0.0
    assert np.isnan(auroc_standard_error(0.8, 0, 20))


@pytest.mark.parametrize("preference", ["simplest", "ensemble"])
def test_a_noise_scorer_stays_out_under_either_preference(preference):
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 30)
    good = labels + 0.6 * rng.standard_normal(60)
    outputs = {"noise": _outputs(rng.standard_normal(60)), "good": _outputs(good)}
    fitted = fit_fusion(outputs, labels, n_trials=0, seed=0, score_preference=preference)
    assert fitted.score_weights == {"noise": 0.0, "good": 1.0}
    assert fitted.search["scores"]["prefer"] == preference and fitted.search["scores"]["tolerance"] >= 0.005


def test_equal_weights_when_validation_cannot_discriminate():
    labels = np.zeros(10, int)
    scores = np.linspace(0, 1, 10)
    fitted = fit_fusion({"a": _outputs(scores), "b": _outputs(scores[::-1])}, labels)
    assert fitted.score_weights == fitted.map_weights == {"a": 0.5, "b": 0.5}
    assert fitted.search["scores"]["reason"] == "single-class validation"


def test_pixel_objective_ignores_rows_without_a_known_mask():
    rng = np.random.default_rng(4)
    labels = np.array([0] * 6 + [1] * 6)
    masks = _defect_masks(labels)
    known = np.ones(12, bool)
    known[-1] = False  # a labelled defect without ground truth: its mask is empty although the label is 1
    masks[-1] = 0
    good = _localising_maps(_defect_masks(labels), rng, 0.1)  # high on the real defect of every anomalous row
    outputs = {"a": {"anomaly_map": good, "pred_score": labels.astype(np.float32)}}
    with_known = fit_fusion(outputs, labels, masks, mask_known=known)
    without = fit_fusion(outputs, labels, masks)
    assert with_known.validation["scorers"]["a"]["pixel_auroc"] == 1.0
    # Counting row 11's defect pixels as negatives (its mask is empty) lowers the pixel AUROC.
    assert without.validation["scorers"]["a"]["pixel_auroc"] < 1.0
    assert with_known.validation["pixel_rows"] == 11


def test_pixel_sampling_keeps_every_defect_pixel_and_is_deterministic():
    rng = np.random.default_rng(5)
    labels = np.array([0] * 10 + [1] * 10)
    masks = _defect_masks(labels, 16)
    maps = _localising_maps(masks, rng, 0.5)
    outputs = {"a": {"anomaly_map": maps, "pred_score": labels.astype(np.float32)}}
    first = fit_fusion(outputs, labels, masks, max_pixels=2000)
    again = fit_fusion(outputs, labels, masks, max_pixels=2000)
    defect_pixels = int(masks.sum())
    assert defect_pixels < first.validation["pixels_sampled"] <= 2000  # every defect pixel + sampled normal ones
    assert first.validation == again.validation
    # An unbiased sample: close to the exact pixel AUROC over all pixels.
    exact = pixel_auroc(masks, first.fuse(outputs)["anomaly_map"])
    assert abs(first.validation["scorers"]["a"]["pixel_auroc"] - exact) < 0.02


def test_per_family_auroc_when_the_validation_names_families():
    rng = np.random.default_rng(6)
    labels = np.array([0] * 10 + [1] * 10)
    families = np.array(["none"] * 10 + ["cutpaste"] * 5 + ["perlin"] * 5)
    scores = np.r_[rng.uniform(0, 1, 10), rng.uniform(0, 1, 5), 5 + rng.uniform(0, 1, 5)]
    fitted = fit_fusion({"a": _outputs(scores), "b": _outputs(-scores)}, labels, families=families, n_trials=5)
    per_family = fitted.validation["per_family"]
    assert set(per_family) == {"cutpaste", "perlin"}
    assert per_family["perlin"]["a"] == 1.0 and per_family["perlin"]["b"] == 0.0
    assert set(per_family["perlin"]) == {"a", "b", "fused"}


def test_round_trip_through_json():
    rng = np.random.default_rng(7)
    labels = np.array([0] * 10 + [1] * 10)
    masks = _defect_masks(labels)
    outputs = {
        "a": _outputs(labels + 0.3 * rng.standard_normal(20)),
        "b": {"anomaly_map": _localising_maps(masks, rng, 0.3), "pred_score": rng.standard_normal(20).astype(np.float32)},
    }
    fitted = fit_fusion(outputs, labels, masks, n_trials=10)
    again = Fusion.from_dict(json.loads(json.dumps(fitted.to_dict(), allow_nan=False)))
    assert again.score_weights == fitted.score_weights and again.map_weights == fitted.map_weights
    assert again.scorers == ["a", "b"] and again.weights == fitted.score_weights
    for key in ("pred_score", "anomaly_map"):
        np.testing.assert_array_equal(again.fuse(outputs)[key], fitted.fuse(outputs)[key])


def test_old_format_fusion_record_still_loads_and_fuses_as_before():
    """A record of the earlier scheme (min/max stats, one ``weights`` dict), as saved bundles hold."""
    old = {
        "weights": {"dfd": 0.25, "knn": 0.75},
        "stats": {
            "dfd": {"map_min": 0.0, "map_max": 2.0, "score_min": 1.0, "score_max": 3.0},
            "knn": {"map_min": 1.0, "map_max": 1.0, "score_min": -1.0, "score_max": 1.0},  # constant map
        },
        "search": {"method": "equal", "reason": "no gain"},
        "threshold": {"method": "f1_max", "threshold": 0.5},
        "scorers": ["dfd", "knn"],
    }
    fusion = Fusion.from_dict(old)
    assert fusion.scorers == ["dfd", "knn"] and fusion.map_weights == fusion.score_weights == old["weights"]
    maps = np.full((1, 2, 2), 1.0, np.float32)
    fused = fusion.fuse({"dfd": {"anomaly_map": maps, "pred_score": np.array([2.0])},
                         "knn": {"anomaly_map": maps, "pred_score": np.array([0.0])}})
    # dfd: (2-1)/2 = 0.5; knn: (0+1)/2 = 0.5 -> 0.5; maps: dfd (1-0)/2 = 0.5, knn (1-1)/1e-12 = 0 -> 0.125
    np.testing.assert_allclose(fused["pred_score"], [0.5])
    np.testing.assert_allclose(fused["anomaly_map"], 0.125)


def test_metrics_summary_reads_both_fusion_formats():
    rng = np.random.default_rng(8)
    labels = np.array([0] * 10 + [1] * 10)
    outputs = {"a": _outputs(labels + 0.2 * rng.standard_normal(20)), "b": _outputs(rng.standard_normal(20))}
    new = {**fit_fusion(outputs, labels, _defect_masks(labels), families=np.where(labels, "perlin", "none")).to_dict(),
           "threshold": {"method": "f1_max", "threshold": 1.0}}
    new["validation"].update({"validation_images": 20, "validation_anomalous": 10})
    summary = fusion_summary(new)
    assert summary["fusion_weights"] == new["score_weights"] and summary["fusion_map_weights"] == new["map_weights"]
    validation = summary["validation"]
    assert (validation["images"], validation["anomalous"]) == (20, 10)
    assert set(validation["scorers"]) == {"a", "b"} and "image_auroc" in validation["fused"]
    assert set(validation["per_family"]) == {"perlin"} and validation["score_selection"]
    old = {"weights": {"a": 0.5, "b": 0.5}, "stats": {}, "search": {"method": "equal", "reason": "no gain"}}
    summary = fusion_summary(old)
    assert summary["fusion_weights"] == summary["fusion_map_weights"] == old["weights"]
    assert summary["fusion_method"] == "equal" and summary["validation"]["scorers"] == {}


def test_repeated_normal_rows_count_once_for_the_few_normals_rule():
    """The validation repeats each support image: 4 distinct normals x 10 rows still use the max."""
    normals = np.repeat([1.0, 2.0, 3.0, 4.0], 10)
    scores = np.r_[normals, 9.0]
    labels = np.r_[np.zeros(40), 1].astype(int)
    stats = ScoreStats.from_normals(np.zeros((41, 2, 2)), scores, labels == 0, normal_quantile=0.95)
    assert stats.normalise_scores(normals).max() == pytest.approx(1.0)
    assert stats.score_loc == pytest.approx(2.5)


def test_the_heat_map_display_range_runs_from_the_normal_tail_to_typical_anomalous_pixels():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 6 + [1] * 6)
    masks = np.zeros((12, 8, 8), np.uint8)
    masks[6:, 2:5, 2:5] = 1
    maps = rng.random((12, 8, 8)).astype(np.float32) * 0.1
    maps[masks == 1] += 1.0
    outputs = {"a": {"anomaly_map": maps, "pred_score": maps.reshape(12, -1).max(axis=1)}}
    fusion = fit_fusion(outputs, labels, masks)
    low, high = fusion.map_display_range()
    fused = fusion.fuse(outputs)["anomaly_map"]
    assert np.quantile(fused[masks == 0], 0.9) <= low < high <= fused[masks == 1].max()
    assert Fusion.from_dict(fusion.to_dict()).map_display_range() == (low, high)
    old = {"weights": {"a": 1.0}, "stats": {"a": {"map_min": 0.0, "map_max": 2.0, "score_min": 0.0, "score_max": 2.0}}}
    assert Fusion.from_dict(old).map_display_range() == (0.0, 1.0)


def test_a_scorer_with_in_sample_validation_normals_is_never_chosen_alone():
    # "fit" looks perfect on validation (its normals are in-sample), "held" slightly less so:
    # without the guard the fusion rests on "fit" alone; with it, "held" always takes part.
    rng = np.random.default_rng(1)
    labels = np.array([0] * 20 + [1] * 20)
    fit = np.r_[rng.normal(0, 0.1, 20), rng.normal(3, 0.1, 20)]
    held = np.r_[rng.normal(0, 1, 20), rng.normal(2, 1, 20)]
    maps = np.zeros((40, 4, 4), np.float32)
    outputs = {"fit": {"anomaly_map": maps, "pred_score": fit}, "held": {"anomaly_map": maps, "pred_score": held}}
    assert fit_fusion(outputs, labels).score_weights == {"fit": 1.0, "held": 0.0}
    guarded = fit_fusion(outputs, labels, in_sample=["fit"]).score_weights
    assert guarded["held"] > 0
    # With only in-sample scorers there is nothing to guard against.
    assert fit_fusion(outputs, labels, in_sample=["fit", "held"]).score_weights == {"fit": 1.0, "held": 0.0}


def test_few_normals_take_their_score_scale_from_their_pixels():
    """Two held-out normals (k = 2) cannot give a stable score spread: with ``auto`` (and
    ``pixels``) the image scores are scaled by the normal pixels' spread; ``scores`` keeps the
    two-value estimate. The location stays the normals' median image score."""
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 0, 1, 1], 5)
    maps = rng.normal(0.0, 2.0, (20, 16, 16)).astype(np.float32)  # pixel spread: q99 - median ~ 4.7
    scores = np.repeat([1.0, 1.001, 8.0, 9.0], 5)  # two nearly equal normals: spread 0.0005
    auto = ScoreStats.from_normals(maps, scores, labels == 0)
    pixel_spread = np.quantile(maps[labels == 0], 0.99) - np.median(maps[labels == 0])
    assert auto.score_scale == pytest.approx(pixel_spread, rel=1e-5) and auto.sources["score"] == "normal_pixels"
    assert auto.score_loc == pytest.approx(1.0005)
    assert ScoreStats.from_normals(maps, scores, labels == 0, score_scale="pixels").score_scale == pytest.approx(pixel_spread, rel=1e-5)
    own = ScoreStats.from_normals(maps, scores, labels == 0, score_scale="scores")
    assert own.score_scale == pytest.approx(0.0005) and own.sources["score"] == "normals"
    many = ScoreStats.from_normals(np.zeros((60, 2, 2)), rng.gamma(2.0, 1.0, 60), np.ones(60, bool))
    assert many.sources["score"] == "normals"  # enough normals: their own quantile
    with pytest.raises(ValueError, match="score_scale"):
        ScoreStats.from_normals(maps, scores, labels == 0, score_scale="minmax")


def test_real_defect_views_weigh_as_much_as_the_many_pseudo_anomalies():
    """40 pseudo-anomalies that scorer "a" separates far better than "b", and 4 held-out real
    defect views that "a" scores below the normals and "b" above them: row by row the
    pseudo-anomalies outvote the real defects (equal weights keep "a"); with the real views as a
    part of their own (the mean of the synthetic and the real AUROC) "b" alone is chosen."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 40 + [1] * 4)
    real = np.array([False] * 60 + [True] * 4)
    a = np.r_[rng.normal(0, 1, 20), rng.normal(4.0, 1, 40), rng.normal(-3, 0.5, 4)]
    b = np.r_[rng.normal(0, 1, 20), rng.normal(1.5, 1, 40), rng.normal(4, 0.5, 4)]
    outputs = {"a": _outputs(a), "b": _outputs(b)}
    plain = fit_fusion(outputs, labels, n_trials=0, seed=0)
    with_real = fit_fusion(outputs, labels, n_trials=0, seed=0, real=real)
    assert plain.score_weights["a"] > 0
    assert with_real.score_weights == {"a": 0.0, "b": 1.0}
    record = with_real.validation["scorers"]
    assert record["b"]["image_auroc_real"] == 1.0 and record["a"]["image_auroc_real"] < 0.05
    assert record["b"]["selection_auroc"] == pytest.approx((record["b"]["image_auroc_synthetic"] + 1.0) / 2)
    assert with_real.search["scores"]["objective_parts"] == ["synthetic", "real"]


def test_real_defect_views_are_compared_with_unseen_good_images_scored_as_they_are():
    """A bank scorer reads its held-out supports high (each scored against a bank without it)
    and unseen good images low (scored against the full bank, as the real defect views and the
    test images are). Against the held-out supports the real views look normal to it (real part
    0); against the unseen good images, scored alike, it is the better scorer and is chosen. The
    unseen images also set its normalisation (their median is its location)."""
    rng = np.random.default_rng(1)
    n_held, n_synthetic, n_real, n_unseen = 6, 30, 6, 20
    labels = np.array([0] * n_held + [1] * n_synthetic + [1] * n_real + [0] * n_unseen)
    real = np.r_[np.zeros(n_held + n_synthetic, bool), np.ones(n_real, bool), np.zeros(n_unseen, bool)]
    unseen = np.r_[np.zeros(n_held + n_synthetic + n_real, bool), np.ones(n_unseen, bool)]
    bank = np.r_[rng.normal(5.0, 0.1, n_held), rng.normal(7.0, 0.5, n_synthetic), rng.normal(3.0, 0.1, n_real),
                 rng.normal(1.0, 0.1, n_unseen)]
    other = np.r_[rng.normal(0, 1, n_held), rng.normal(2.0, 1, n_synthetic), rng.normal(0, 1, n_real),
                  rng.normal(0, 1, n_unseen)]
    outputs = {"bank": _outputs(bank), "other": _outputs(other)}
    first = ~unseen  # the validation without the unseen images
    without = fit_fusion({n: {k: v[first] for k, v in o.items()} for n, o in outputs.items()}, labels[first],
                         n_trials=0, seed=0, real=real[first])
    assert without.validation["scorers"]["bank"]["image_auroc_real"] == 0.0  # real views below the held-out supports
    fitted = fit_fusion(outputs, labels, n_trials=0, seed=0, real=real, unseen=unseen)
    record = fitted.validation["scorers"]["bank"]
    assert record["image_auroc_real"] == 1.0 and record["image_auroc_synthetic"] == 1.0
    assert fitted.score_weights == {"bank": 1.0, "other": 0.0}
    assert fitted.stats["bank"].score_loc == pytest.approx(np.median(bank[unseen]))
    assert fitted.validation["unseen_normal_rows"] == n_unseen


def test_a_validation_made_from_unseen_good_images_compares_its_defects_with_them():
    """Without held-out supports (the split made from unseen good images) the synthetic part's
    negatives are the unseen images: the scorer that separates its defects from them is chosen."""
    rng = np.random.default_rng(2)
    n_unseen, n_synthetic = 20, 40
    labels = np.r_[np.zeros(n_unseen, int), np.ones(n_synthetic, int)]
    unseen = labels == 0
    good = np.r_[rng.normal(0, 1, n_unseen), rng.normal(4, 1, n_synthetic)]
    noise = rng.normal(0, 1, n_unseen + n_synthetic)
    fitted = fit_fusion({"good": _outputs(good), "noise": _outputs(noise)}, labels, n_trials=0, seed=0, unseen=unseen)
    assert fitted.search["scores"]["objective_parts"] == ["synthetic"]
    assert fitted.validation["scorers"]["good"]["selection_auroc"] > 0.95
    assert fitted.score_weights == {"good": 1.0, "noise": 0.0}
    assert fitted.stats["good"].score_loc == pytest.approx(np.median(good[unseen]))


def test_the_ensemble_takes_a_weak_scorer_only_into_a_mix_that_beats_the_best_single_one():
    vectors, monte_carlo = candidate_weights(3, 0, seed=0)  # a, b, c, ab, ac, bc, abc
    separations = np.zeros(len(vectors))
    # juice_bottle at k = 1: kNN (a) 0.896 alone, DFD (b) and the bank (c) far below; every mix
    # within the standard error of kNN but none above it -> kNN alone.
    juice = np.array([0.896, 0.646, 0.635, 0.880, 0.878, 0.70, 0.890])
    chosen, reason = select_weights(vectors, monte_carlo, juice, separations, 0.049, "ensemble")
    assert chosen == 0 and "best single scorer (0.8960)" in reason
    assert weak_scorers(vectors, monte_carlo, juice, 0.049)[0].tolist() == [False, True, True]
    # KolektorSDD: DFD (a) best alone, the other two weak, but all three together above it -> all three.
    kolektor = np.array([0.723, 0.648, 0.650, 0.70, 0.71, 0.69, 0.738])
    assert select_weights(vectors, monte_carlo, kolektor, separations, 0.05, "ensemble")[0] == 6
    # No weak scorer: the near tie keeps every scorer, as before.
    close = np.array([0.826, 0.823, 0.80, 0.828, 0.81, 0.81, 0.82])
    assert select_weights(vectors, monte_carlo, close, separations, 0.05, "ensemble")[0] == 6
    # simplest is unchanged by the rule.
    assert select_weights(vectors, monte_carlo, juice, separations, 0.005, "simplest")[0] == 0


def test_the_search_record_lists_every_subset_objective():
    rng = np.random.default_rng(1)
    labels = np.array([0] * 20 + [1] * 20)
    outputs = {"noise": _outputs(rng.standard_normal(40)), "good": _outputs(labels + 0.5 * rng.standard_normal(40))}
    fitted = fit_fusion(outputs, labels, n_trials=5, seed=0, score_preference="ensemble")
    subsets = fitted.search["scores"]["subsets"]
    assert [entry["scorers"] for entry in subsets] == [["noise"], ["good"], ["noise", "good"]]
    good = fitted.validation["scorers"]["good"]["selection_auroc"]
    assert subsets[1]["objective"] == pytest.approx(good)


def _specialist_case(seed: int, bank_on_real: float) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """20 unseen good images, 40 pseudo-anomalies and 6 views of labelled defects. ``general``
    separates both kinds of defect from the normals; ``bank`` (a specialist) is at chance on the
    pseudo-anomalies and scores the labelled views at ``bank_on_real``."""
    rng = np.random.default_rng(seed)
    n_unseen, n_synthetic, n_real = 20, 40, 6
    labels = np.r_[np.zeros(n_unseen, int), np.ones(n_synthetic + n_real, int)]
    unseen = labels == 0
    real = np.r_[np.zeros(n_unseen + n_synthetic, bool), np.ones(n_real, bool)]
    general = np.r_[rng.normal(0, 1, n_unseen), rng.normal(2.0, 1, n_synthetic), rng.normal(2.5, 1, n_real)]
    bank = np.r_[rng.normal(0, 1, n_unseen), rng.normal(0, 1, n_synthetic), rng.normal(bank_on_real, 0.3, n_real)]
    return {"general": _outputs(general), "bank": _outputs(bank)}, labels, real, unseen


def test_a_specialist_is_judged_on_the_labelled_defect_views_alone():
    """A specialist at chance on the pseudo-anomalies but perfect on the labelled defect views
    stays out of a search over the whole validation (mixed in, it dilutes the general scorer's
    separation of the pseudo-anomalies) and joins, with an equal share, when it is judged on
    those views only: there it is better than the general scorer."""
    outputs, labels, real, unseen = _specialist_case(3, bank_on_real=5.0)
    options = dict(n_trials=0, seed=0, real=real, unseen=unseen, score_preference="ensemble")
    whole = fit_fusion(outputs, labels, **options)
    assert whole.score_weights == {"general": 1.0, "bank": 0.0}
    fitted = fit_fusion(outputs, labels, specialists=["bank"], **options)
    assert fitted.score_weights == {"general": 0.5, "bank": 0.5}
    record = fitted.search["scores"]["specialists"]
    assert record["admitted"] == ["bank"]
    assert record["scorers"]["bank"]["auroc_labelled_views"] == 1.0
    assert record["mix_auroc_labelled_views"] < 0.95
    # the subsets searched were the general scorers' only
    assert all("bank" not in subset["scorers"] for subset in fitted.search["scores"]["subsets"])


def test_a_specialist_that_does_not_recognise_the_labelled_defects_stays_out():
    outputs, labels, real, unseen = _specialist_case(1, bank_on_real=-2.0)
    fitted = fit_fusion(outputs, labels, n_trials=0, seed=0, real=real, unseen=unseen, specialists=["bank"])
    assert fitted.score_weights == {"general": 1.0, "bank": 0.0}
    assert fitted.search["scores"]["specialists"]["admitted"] == []
    assert fitted.search["scores"]["specialists"]["scorers"]["bank"]["admitted"] is False


def test_without_labelled_defect_views_a_specialist_gets_no_image_weight():
    outputs, labels, real, unseen = _specialist_case(2, bank_on_real=5.0)
    keep = ~real
    outputs = {n: {k: v[keep] for k, v in o.items()} for n, o in outputs.items()}
    fitted = fit_fusion(outputs, labels[keep], n_trials=0, seed=0, unseen=unseen[keep], specialists=["bank"])
    assert fitted.score_weights == {"general": 1.0, "bank": 0.0}
    assert fitted.search["scores"]["specialists"]["reason"].startswith("no labelled defect views")


def test_a_specialist_stays_out_where_the_mix_already_recognises_every_labelled_view():
    """The general scorer ranks every labelled view above every good image (AUROC 1, standard
    error 0): a perfect specialist cannot show what it would add, and stays out."""
    outputs, labels, real, unseen = _specialist_case(0, bank_on_real=5.0)
    fitted = fit_fusion(outputs, labels, n_trials=0, seed=0, real=real, unseen=unseen, specialists=["bank"])
    record = fitted.search["scores"]["specialists"]
    assert record["mix_auroc_labelled_views"] == 1.0 and record["scorers"]["bank"]["auroc_labelled_views"] == 1.0
    assert fitted.score_weights == {"general": 1.0, "bank": 0.0}


def test_a_specialist_named_by_a_bare_string_is_one_name_and_without_pixels_its_map_has_a_share():
    """``--params fusion.specialists=anomalous_bank`` arrives as a string: it names one scorer (not
    its letters). Left out of the image score, the specialist's map still counts: without
    validation pixels the maps take the general weights with the specialist at an equal share."""
    outputs, labels, real, unseen = _specialist_case(1, bank_on_real=-2.0)
    options = dict(n_trials=0, seed=0, real=real, unseen=unseen)
    as_list = fit_fusion(outputs, labels, specialists=["bank"], **options)
    as_string = fit_fusion(outputs, labels, specialists="bank", **options)
    assert as_string.score_weights == as_list.score_weights == {"general": 1.0, "bank": 0.0}
    assert as_string.map_weights == as_list.map_weights == {"general": 0.5, "bank": 0.5}
    assert as_string.search["scores"]["specialists"]["scorers"]["bank"]["admitted"] is False


def test_a_specialist_map_joins_the_general_map_mix_whatever_the_validation_pixels_say():
    """The specialist's map is noise on every validation pixel (pseudo-anomalies are not its
    defect types, and each labelled view is scored without its own shot): weighed with the others
    (``search``) it is left out; by default (``join``) the general maps are weighed without it and
    it joins them at an equal share, while the image-score weights stay as the specialist rule
    set them."""
    outputs, labels, real, unseen = _specialist_case(1, bank_on_real=-2.0)
    rng = np.random.default_rng(5)
    masks = _defect_masks(labels)
    outputs["general"]["anomaly_map"] = _localising_maps(masks, rng, 0.5)
    outputs["bank"]["anomaly_map"] = rng.standard_normal(masks.shape).astype(np.float32)
    options = dict(n_trials=0, seed=0, real=real, unseen=unseen, specialists=["bank"])
    searched = fit_fusion(outputs, labels, masks, specialist_maps="search", **options)
    assert searched.map_weights == {"general": 1.0, "bank": 0.0}
    joined = fit_fusion(outputs, labels, masks, **options)
    assert joined.map_weights == {"general": 0.5, "bank": 0.5}
    assert joined.score_weights == searched.score_weights == {"general": 1.0, "bank": 0.0}
    assert joined.search["maps"]["specialists"]["joined"] == ["bank"]
    assert all("bank" not in subset["scorers"] for subset in joined.search["maps"]["subsets"])
    with pytest.raises(ValueError, match="specialist_maps"):
        fit_fusion(outputs, labels, masks, specialist_maps="always", **options)


def test_with_equal_shares_scales_the_weighted_scorers_and_adds_the_joining_ones():
    from fsad_pipeline.scoring.fusion import with_equal_shares

    assert with_equal_shares({"a": 0.75, "b": 0.25, "c": 0.0, "s": 0.0}, ["s"]) == pytest.approx(
        {"a": 0.5, "b": 1 / 6, "c": 0.0, "s": 1 / 3}
    )
    assert with_equal_shares({"a": 1.0, "s": 0.0}, []) == {"a": 1.0, "s": 0.0}


def test_each_view_of_the_labelled_defects_is_compared_with_good_images_in_that_view():
    """An aligned part: "position" reads any turned image as anomalous (it knows where things
    are) and misses the defects themselves; "detector" sees the defects in every view and reads
    turned good images as good. Against upright good images only, position's turned defect
    views rank above every normal and lift its real part well above chance; with the good
    images turned as the defects were, it falls to chance there and detector alone is chosen. The turned good images
    are negatives of their own view only: not normals of the normalisation, nor of the reported
    AUROCs."""
    rng = np.random.default_rng(4)
    n_unseen, n_synthetic, shots = 20, 40, 3
    view_names = ["original", "rot90x2", "hflip"]
    n_real = shots * len(view_names)
    turned = np.tile(np.asarray(view_names) != "original", shots)
    labels = np.r_[np.zeros(n_unseen, int), np.ones(n_synthetic + n_real, int)]
    unseen = labels == 0
    real = np.r_[np.zeros(n_unseen + n_synthetic, bool), np.ones(n_real, bool)]
    views = np.r_[np.full(n_unseen + n_synthetic, "original"), np.tile(view_names, shots)]
    position = np.r_[rng.normal(0, 1, n_unseen), rng.normal(0, 1, n_synthetic), np.where(turned, 8.0, 0.0) + rng.normal(0, 0.3, n_real)]
    detector = np.r_[rng.normal(0, 1, n_unseen), rng.normal(1.5, 1, n_synthetic), rng.normal(3.0, 0.3, n_real)]
    outputs = {"position": _outputs(position), "detector": _outputs(detector)}
    upright = fit_fusion(outputs, labels, n_trials=0, seed=0, real=real, unseen=unseen, views=views)
    assert upright.validation["scorers"]["position"]["image_auroc_real"] > 0.6  # credited for the turned views
    # the same good images turned and mirrored: position flags them all, detector does not
    viewed_names = np.repeat(["rot90x2", "hflip"], n_unseen)
    viewed_position = rng.normal(8.0, 0.3, len(viewed_names))
    viewed_detector = rng.normal(0, 1, len(viewed_names))
    all_outputs = {
        "position": _outputs(np.r_[position, viewed_position]),
        "detector": _outputs(np.r_[detector, viewed_detector]),
    }
    all_labels = np.r_[labels, np.zeros(len(viewed_names), int)]
    fitted = fit_fusion(
        all_outputs, all_labels, n_trials=0, seed=0, real=np.r_[real, np.zeros(len(viewed_names), bool)],
        unseen=np.r_[unseen, np.zeros(len(viewed_names), bool)], views=np.r_[views, viewed_names],
    )
    record = fitted.validation["scorers"]
    assert record["position"]["image_auroc_real"] < 0.75 and record["detector"]["image_auroc_real"] > 0.95
    assert fitted.score_weights == {"position": 0.0, "detector": 1.0}
    assert fitted.validation["viewed_normal_rows"] == len(viewed_names)
    # the viewed rows change neither the normalisation nor the AUROC over the rows as taken
    assert fitted.stats["position"].score_loc == pytest.approx(np.median(position[unseen]))
    assert record["detector"]["image_auroc"] == upright.validation["scorers"]["detector"]["image_auroc"]
