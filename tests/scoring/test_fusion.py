import numpy as np

from fsad_pipeline.scoring.fusion import Fusion, fit_fusion


def _outputs(scores: np.ndarray, size: int = 8) -> dict:
    maps = np.repeat(scores[:, None, None], size * size, axis=1).reshape(len(scores), size, size).astype(np.float32)
    return {"anomaly_map": maps, "pred_score": scores.astype(np.float32)}


def test_informative_scorer_outweighs_noise_and_round_trips():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 20)
    good = labels + 0.3 * rng.standard_normal(40)
    noise = rng.standard_normal(40)
    fitted = fit_fusion({"good": _outputs(good), "noise": _outputs(noise)}, labels, n_trials=200, seed=0)
    assert fitted.search["method"] == "monte_carlo"
    assert fitted.weights["good"] > fitted.weights["noise"]
    again = Fusion.from_dict(fitted.to_dict())
    outputs = {"good": _outputs(good), "noise": _outputs(noise)}
    np.testing.assert_allclose(again.fuse(outputs)["pred_score"], fitted.fuse(outputs)["pred_score"])


def test_equal_weights_when_validation_cannot_discriminate():
    labels = np.zeros(10, int)
    scores = np.linspace(0, 1, 10)
    fitted = fit_fusion({"a": _outputs(scores), "b": _outputs(scores[::-1])}, labels)
    assert fitted.weights == {"a": 0.5, "b": 0.5} and fitted.search["reason"] == "single-class validation"


def test_pixel_term_ignores_rows_without_a_known_mask():
    labels = np.array([0, 0, 1, 1])
    masks = np.zeros((4, 8, 8), np.uint8)
    masks[2, :4] = 1
    scores = np.array([0.1, 0.2, 0.9, 0.95])
    maps = _outputs(scores)
    maps["anomaly_map"][2, 4:] = 0.0  # the defect's map is high exactly on its mask
    known = np.array([True, True, True, False])  # row 3: a labelled defect without ground truth (empty mask)
    outputs = {"a": maps, "b": _outputs(scores)}
    # n_trials=0: equal weights, and the search record holds their validation objective.
    with_known = fit_fusion(outputs, labels, masks, mask_known=known, pixel_weight=1.0, n_trials=0)
    without = fit_fusion(outputs, labels, masks, pixel_weight=1.0, n_trials=0)
    assert with_known.search["validation_objective"] == 2.0  # image AUROC 1 + pixel AUROC 1
    # Counting row 3's all-high map against an empty mask lowers the pixel AUROC.
    assert without.search["validation_objective"] < 2.0
