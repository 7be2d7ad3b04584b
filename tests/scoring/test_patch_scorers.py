import numpy as np
import pytest
import torch

from fsad_pipeline.scoring.dfd_scorer import FeatureConfig
from fsad_pipeline.scoring.patch_scorers import PatchScorerSet, fit_patch_scorers, score_patch_features

FEATURES = FeatureConfig(pretrain_dim=16, target_dim=16, image_size=64, batch_size=8)
OPTIONS = dict(
    knn={"coreset_ratio": 0.5, "num_neighbors": 3, "backend": "torch"},
    gaussian={"enabled": True, "epsilon": 0.01},
    anomalous_bank={"top_fraction": 0.1},
)


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)


def test_leave_one_support_out_validation_and_round_trip(tmp_path):
    support = _images(6, 0)  # 2 supports x 3 views, image-major
    validation = _images(4, 1)
    sources = np.array([0, 1, 0, 1])
    fitted, outputs = fit_patch_scorers(
        support, FEATURES, n_supports=2, validation_images=validation, validation_sources=sources,
        progress=False, **OPTIONS,
    )
    assert set(fitted.scorers) == {"knn", "gaussian"} and fitted.info["validation"] == "leave-one-support-out"
    assert outputs["knn"]["anomaly_map"].shape == (4, 64, 64) and outputs["knn"]["pred_score"].shape == (4,)
    # A validation image that IS a support view scores ~0 in-bank but not when its support is left out.
    _, same = fit_patch_scorers(
        support, FEATURES, n_supports=2, validation_images=support[:1], validation_sources=np.array([0]),
        progress=False, **OPTIONS,
    )
    assert same["knn"]["pred_score"][0] > 1e-3
    fitted.save(tmp_path / "scorers")
    loaded = PatchScorerSet.load(tmp_path / "scorers")
    extractor = loaded.build_extractor()
    from fsad_pipeline.models.features import extract_features

    feats = extract_features(extractor, validation, image_size=64, dual_path=False, progress=False)
    a = score_patch_features(fitted.scorers, feats, 64, 4.0)
    b = score_patch_features(loaded.scorers, feats, 64, 4.0)
    for name in a:
        np.testing.assert_array_equal(a[name]["pred_score"], b[name]["pred_score"])


def test_defect_shots_add_the_anomalous_bank():
    support = _images(3, 2)
    defects = _images(1, 3)
    fitted, _ = fit_patch_scorers(support, FEATURES, defect_images=defects, progress=False, **OPTIONS)
    assert "anomalous_bank" in fitted.scorers
    torch.manual_seed(0)


def test_defect_views_are_scored_leave_one_shot_out():
    support = _images(3, 4)
    defects = _images(2, 5)
    # Row 0: a view of shot 0 itself; in-bank the anomalous bank would read it as a perfect match.
    validation = np.concatenate([defects[:1], _images(1, 6)])
    fitted, outputs = fit_patch_scorers(
        support, FEATURES, defect_images=defects, validation_images=validation,
        validation_sources=np.array([-1, 0]), validation_defect_shots=np.array([0, -1]),
        progress=False, **OPTIONS,
    )
    assert fitted.info["validation_defect_views"] == 1
    from fsad_pipeline.models.features import extract_features

    feats = extract_features(fitted.build_extractor(), defects[:1], image_size=64, dual_path=False, progress=False)
    in_bank = score_patch_features(fitted.scorers, feats, 64, 4.0)["anomalous_bank"]["pred_score"][0]
    assert outputs["anomalous_bank"]["pred_score"][0] != in_bank
    np.testing.assert_allclose(  # the normal kNN bank never held the defect: same score either way
        outputs["knn"]["pred_score"][0], score_patch_features(fitted.scorers, feats, 64, 4.0)["knn"]["pred_score"][0],
        rtol=1e-5,
    )


def test_anomalous_bank_measures_normal_distance_against_the_knn_coreset():
    support = _images(3, 7)
    defects = _images(1, 8)
    coreset, _ = fit_patch_scorers(support, FEATURES, defect_images=defects, progress=False, **OPTIONS)
    bank = coreset.scorers["anomalous_bank"].normal_bank
    np.testing.assert_array_equal(bank.numpy(), coreset.scorers["knn"].bank)  # 50 % of the patches
    every = {**OPTIONS, "anomalous_bank": {**OPTIONS["anomalous_bank"], "normal_bank": "all"}}
    full, _ = fit_patch_scorers(support, FEATURES, defect_images=defects, progress=False, **every)
    assert full.scorers["anomalous_bank"].normal_bank.shape[0] == 2 * bank.shape[0]
    wrong = {**OPTIONS, "anomalous_bank": {**OPTIONS["anomalous_bank"], "normal_bank": "half"}}
    with pytest.raises(ValueError, match="normal_bank"):
        fit_patch_scorers(support, FEATURES, defect_images=defects, progress=False, **wrong)


def test_rows_made_from_unseen_good_images_are_scored_by_the_fitted_scorers():
    support = _images(6, 9)  # 2 supports x 3 views
    validation = np.concatenate([_images(2, 10), support[:1]])
    sources = np.array([-1, -1, 0])  # two unseen good images, then a row made from support 0
    fitted, outputs = fit_patch_scorers(
        support, FEATURES, n_supports=2, validation_images=validation, validation_sources=sources,
        progress=False, **OPTIONS,
    )
    from fsad_pipeline.models.features import extract_features

    feats = extract_features(fitted.build_extractor(), validation, image_size=64, dual_path=False, progress=False)
    direct = score_patch_features(fitted.scorers, feats, 64, 4.0)
    for name in ("knn", "gaussian"):  # unseen rows: exactly what a new image gets
        np.testing.assert_allclose(outputs[name]["pred_score"][:2], direct[name]["pred_score"][:2], rtol=1e-5)
    assert outputs["knn"]["pred_score"][2] > direct["knn"]["pred_score"][2] + 0.1  # the support row: left out


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("normal_bank", ["coreset", "all"])
def test_knn_and_anomalous_bank_share_one_search_with_the_same_scores(distance, normal_bank):
    """One search serves both scorers when the bank's d_n is against the kNN coreset; every
    score equals what the two scorers give on their own (and the other bank is left alone)."""
    from fsad_pipeline.models.anomalous_bank import AnomalousBankScorer
    from fsad_pipeline.models.memory_bank import MemoryBankScorer
    from fsad_pipeline.scoring import patch_scorers

    generator = torch.Generator().manual_seed(0)
    support = torch.randn(4, 24, 6, 6, generator=generator).abs() + 0.1
    knn = MemoryBankScorer(coreset_ratio=0.5, distance=distance, backend="torch", progress=False).fit(support)
    normal = patch_scorers._normal_bank(normal_bank, knn, support)
    anomalous = AnomalousBankScorer().fit(torch.randn(10, 24, generator=generator).abs(), normal)
    queries = torch.randn(3, 24, 6, 6, generator=generator).abs()
    shared = patch_scorers._shared_search({"knn": knn, "anomalous_bank": anomalous}, queries)
    assert bool(shared) == (normal_bank == "coreset")
    outputs = score_patch_features({"knn": knn, "anomalous_bank": anomalous}, queries, 12, 1.0)
    alone = {
        "knn": score_patch_features({"knn": knn}, queries, 12, 1.0)["knn"],
        "anomalous_bank": score_patch_features({"anomalous_bank": anomalous}, queries, 12, 1.0)["anomalous_bank"],
    }
    for name in ("knn", "anomalous_bank"):
        np.testing.assert_allclose(outputs[name]["pred_score"], alone[name]["pred_score"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(outputs[name]["anomaly_map"], alone[name]["anomaly_map"], rtol=1e-5, atol=1e-6)
    if shared:
        _, raw = knn.patch_scores_and_raw_distances(queries)
        flat = queries.permute(0, 2, 3, 1).reshape(-1, 24)
        np.testing.assert_allclose(raw.reshape(-1), torch.cdist(flat, normal).amin(dim=1), rtol=1e-5, atol=1e-5)


def test_the_patch_maps_are_smoothed_at_test_time_as_they_were_for_the_validation(tmp_path, tiny_model_parts):
    """memory_bank.map_sigma is recorded with the fitted set (and saved with it): the ensemble
    smooths the patch scorers' test maps with it, whatever DFD's own map_sigma is; a set saved
    before it was recorded gets the old shared default, 4.0."""
    from fsad_pipeline.scoring.ensemble import assemble
    from fsad_pipeline.scoring.patch_scorers import PatchScorerSet

    patch = tiny_model_parts["patch_scorers"]
    assert patch.info["map_sigma"] == 4.0
    sharper = PatchScorerSet(patch.features, patch.scorers, {**patch.info, "map_sigma": 1.5})
    sharper.save(tmp_path / "set")
    loaded = PatchScorerSet.load(tmp_path / "set")
    assert assemble(None, loaded, image_size=32).map_sigma == 1.5
    older = PatchScorerSet(patch.features, patch.scorers, {k: v for k, v in patch.info.items() if k != "map_sigma"})
    assert assemble(None, older, image_size=32).map_sigma == 4.0
    assert assemble(None, loaded, image_size=32, map_sigma=2.0).map_sigma == 2.0  # an explicit value wins
