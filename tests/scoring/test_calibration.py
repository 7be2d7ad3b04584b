import numpy as np
import pytest

from fsad_pipeline.scoring.calibration import calibrate_threshold, target_fpr_threshold


def test_f1_max_separable():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    result = calibrate_threshold(labels, scores, method="f1_max")
    assert result["method"] == "f1_max" and result["validation_f1"] == 1.0
    assert 0.3 < result["threshold"] <= 0.8


def test_target_fpr_is_the_conformal_order_statistic():
    """n good images: a new good image is flagged with probability (j + 1) / (n + 1), j the
    calibration scores left above the threshold; j is the largest with that <= the target."""
    normals = np.arange(100.0)
    result = calibrate_threshold(np.r_[np.zeros(100), np.ones(3)], np.r_[normals, [200.0, 300.0, 400.0]],
                                 target_false_alarm_rate=0.1)
    assert result["method"] == "target_fpr"
    # floor(0.1 * 101) - 1 = 9 calibration scores stay above: the threshold sits just above 90.
    assert 90.0 < result["threshold"] <= np.nextafter(90.0, np.inf)
    assert result["expected_false_alarm_rate"] == pytest.approx(10 / 101) and result["calibration_normals"] == 100
    assert result["calibration_false_alarm_rate"] == pytest.approx(0.09)


def test_target_fpr_holds_on_new_good_images_from_the_same_process():
    """Many draws of 40 calibration + 2000 new good images: the mean false-alarm rate is the expected one."""
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(400):
        result = target_fpr_threshold(rng.gamma(2.0, 1.0, 40), 0.05)
        rates.append(np.mean(rng.gamma(2.0, 1.0, 2000) >= result["threshold"]))
    assert result["expected_false_alarm_rate"] == pytest.approx(2 / 41)
    assert np.mean(rates) == pytest.approx(2 / 41, abs=0.006)


def test_too_few_good_images_say_what_rate_to_expect(caplog):
    result = target_fpr_threshold(np.array([1.0, 2.0]), 0.05)
    assert result["threshold"] > 2.0 and result["expected_false_alarm_rate"] == pytest.approx(1 / 3)
    assert "cannot resolve" in caplog.text


def test_f1_max_without_defects_falls_back_to_the_target_rate():
    result = calibrate_threshold(np.zeros(20), np.arange(20.0), method="f1_max", target_false_alarm_rate=0.05)
    assert result["method"] == "target_fpr" and result["threshold"] > 19.0


def test_the_earlier_method_name_still_works_and_unknown_ones_do_not():
    assert calibrate_threshold([0] * 40, np.arange(40.0), method="false_alarm_rate")["method"] == "target_fpr"
    with pytest.raises(ValueError, match="threshold method"):
        calibrate_threshold([0, 1], [0.0, 1.0], method="magic")
    with pytest.raises(ValueError, match="target_false_alarm_rate"):
        target_fpr_threshold(np.arange(5.0), 0.0)


def test_calibration_and_fusion_images_are_disjoint_pool_images_that_are_neither_supports_nor_test_images():
    import pandas as pd

    from fsad_pipeline.data.sampling import unseen_good_paths

    manifest = pd.DataFrame({
        "path": [f"train/{i}.png" for i in range(10)] + [f"test/{i}.png" for i in range(5)],
        "split": ["train"] * 10 + ["test"] * 5, "label": [0] * 10 + [0, 0, 1, 1, 1],
    })
    selection = {"rounds": [["train/0.png", "train/3.png"], ["train/5.png", "train/3.png"]]}
    chosen, fusion = unseen_good_paths(manifest, selection, calibration=4, fusion=2, seed=0)
    assert len(chosen) == 4 and chosen == sorted(chosen) and len(fusion) == 2 and fusion == sorted(fusion)
    assert not set(chosen) & set(fusion)
    assert all(p.startswith("train/") for p in chosen + fusion)
    assert not {"train/0.png", "train/3.png", "train/5.png"} & set(chosen + fusion)
    assert unseen_good_paths(manifest, selection, calibration=4, fusion=2, seed=0) == (chosen, fusion)  # seeded
    # The fusion takes at most a third of the 7 unseen images; the threshold the rest.
    calibration, fusion = unseen_good_paths(manifest, selection, calibration=50, fusion=50, seed=0)
    assert len(fusion) == 2 and len(calibration) == 5
    assert len(unseen_good_paths(manifest, selection, calibration=50, seed=0)[0]) == 7  # the whole rest of the pool
    assert unseen_good_paths(manifest, selection, calibration=0, seed=0) == ([], [])


def _validation(labels, sources, shots):
    from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet

    n = len(labels)
    images = np.zeros((n, 4, 4, 3), np.uint8)
    masks = np.zeros((n, 4, 4), np.uint8)
    masks[np.asarray(labels) == 1, 1, 1] = 1
    return PseudoAnomalySet(images, images, masks, np.asarray(labels, np.int64), np.asarray(sources, np.int64),
                            defect_shot=np.asarray(shots, np.int64))


def test_the_decision_uses_the_calibration_images_else_the_held_out_supports():
    from fsad_pipeline.pipelines.scoring.nodes import calibrate_decision

    validation = _validation([0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 1, -1], [-1] * 6 + [0])
    scores = np.array([0.1, 0.1, 0.3, 0.3, 5.0, 6.0, 9.0])
    pool = np.linspace(0.0, 1.0, 40)
    decision = calibrate_decision(scores, validation, pool, method="target_fpr", target_false_alarm_rate=0.05)
    assert decision["calibration_normals"] == 40 and decision["exchangeable"] and "support pool" in decision["calibration_source"]
    assert decision["expected_false_alarm_rate"] == pytest.approx(2 / 41)
    fallback = calibrate_decision(scores, validation, None, method="target_fpr", target_false_alarm_rate=0.05)
    assert fallback["calibration_normals"] == 2 and fallback["threshold"] > 0.3  # one row per support image
    assert not fallback["exchangeable"] and fallback["expected_false_alarm_rate"] is None and "no false-alarm" in fallback["note"]
    f1 = calibrate_decision(scores, validation, pool, method="f1_max", target_false_alarm_rate=0.05)
    assert f1["method"] == "f1_max" and f1["real_defect_views"] == 1 and 1.0 < f1["threshold"] <= 9.0


def test_without_calibration_images_the_validation_unseen_good_images_promise_no_rate():
    """They set the fusion's normalisation, so they are not exchangeable with new good images."""
    from fsad_pipeline.pipelines.scoring.nodes import calibrate_decision

    validation = _validation([0, 0, 0, 1, 1], [-1] * 5, [-1] * 5)  # made from unseen good images
    scores = np.array([0.1, 0.2, 0.3, 5.0, 6.0])
    decision = calibrate_decision(scores, validation, None, method="target_fpr", target_false_alarm_rate=0.05)
    assert decision["calibration_normals"] == 3 and "unseen good images" in decision["calibration_source"]
    assert not decision["exchangeable"] and decision["expected_false_alarm_rate"] is None


def test_nan_calibration_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        target_fpr_threshold(np.array([0.1, np.nan, 0.3]), 0.05)
