import numpy as np
import torch

from fsad_pipeline.models.features import extract_features
from fsad_pipeline.scoring.dfd_scorer import FeatureConfig, _training_features, distinct_images
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet


def test_distinct_images_finds_byte_identical_rows():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    images = np.stack([a, b, a, a, b])
    first, inverse = distinct_images(images)
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0, 0, 1]
    np.testing.assert_array_equal(images[first][inverse], images)
    changed = images.copy()
    changed[3, 0, 0, 0] ^= 1  # one bit is another image
    assert len(distinct_images(changed)[0]) == 3


def test_training_features_extract_each_clean_image_once(monkeypatch):
    rng = np.random.default_rng(1)
    supports = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    normals = supports[[0, 0, 0, 1, 1, 1]]  # no rotation: every sample of a support shares its clean image
    samples = PseudoAnomalySet(
        images=rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8),
        normals=normals,
        masks=np.zeros((6, 32, 32), np.uint8),
        labels=np.zeros(6, np.int64),
        source_index=np.array([0, 0, 0, 1, 1, 1]),
    )
    features = FeatureConfig(pretrained=False, pretrain_dim=8, target_dim=8, image_size=32, batch_size=4)
    extractor = features.build_extractor()
    counts: list[int] = []
    import fsad_pipeline.scoring.dfd_scorer as module

    def counting(extractor_, images, **kwargs):
        counts.append(len(images))
        return extract_features(extractor_, images, **kwargs)

    monkeypatch.setattr(module, "extract_features", counting)
    cached = _training_features(extractor, samples, features, torch.device("cpu"), False)
    assert counts == [2, 6]  # 2 distinct normals, 6 augmented samples
    direct_low, direct_high = extract_features(extractor, normals, image_size=32, batch_size=4, progress=False)
    assert cached.normal_low.shape[0] == 2 and len(cached) == 6  # each clean image kept once
    every = cached.normal_index
    assert every.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(cached.normal_low[every], direct_low, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.normal_high[every], direct_high, rtol=1e-5, atol=1e-5)
    # a subset keeps the shared rows and re-indexes them
    part = cached.subset(torch.tensor([4, 1]))
    assert part.normal_low.shape[0] == 2 and part.normal_index.tolist() == [1, 0]
    torch.testing.assert_close(part.aug_low, cached.aug_low[[4, 1]], rtol=0, atol=0)



# --- cross-fitting -------------------------------------------------------------------------

import json  # noqa: E402

import pytest  # noqa: E402

from fsad_pipeline.models.dfd_training import DFDTrainConfig, compute_path_maps, save_dfd  # noqa: E402
from fsad_pipeline.scoring.dfd_scorer import SCORER_CONFIG_FILE, DFDScorer, score_held_out_in_chunks, support_folds  # noqa: E402


def test_support_folds_split_the_supports_into_disjoint_groups():
    assert support_folds(1, 2) == [[]]  # one support: nothing to hold out
    assert support_folds(4, None) == [[]] and support_folds(4, 1) == [[]]
    assert support_folds(2, 2) == [[0], [1]]
    assert support_folds(4, 2) == [[0, 1], [2, 3]]
    assert support_folds(3, 5) == [[0], [1], [2]]  # more folds than supports: leave-one-out
    groups = support_folds(7, 3)
    assert sorted(i for g in groups for i in g) == list(range(7)) and {len(g) for g in groups} <= {2, 3}


def _cross_fit(datasets, scoring):
    rng = np.random.default_rng(3)
    train, validation = datasets.pseudo_anomaly_set(rng, 8, 32), datasets.pseudo_anomaly_set(rng, 8, 32)
    features = FeatureConfig(pretrain_dim=16, target_dim=16, image_size=32, batch_size=8)
    config = DFDTrainConfig(meta_epochs=1, epochs=1, gaussian_hidden=16, seed=0)
    scorer = DFDScorer.fit(train, validation, features=features, train_config=config, cross_fit_folds=2,
                           cross_fit_scoring=scoring, device="cpu", progress=False)
    return scorer, validation


@pytest.fixture
def cross_fitted(datasets):
    """Validators only: new images get their mean map."""
    return _cross_fit(datasets, "members")


@pytest.fixture
def with_full_member(datasets):
    """Validators plus a scoring member trained on every support (the default)."""
    return _cross_fit(datasets, "full")


def test_cross_fitted_members_never_see_the_supports_they_score(cross_fitted):
    scorer, validation = cross_fitted
    assert scorer.cross_fitted and [m.held_out for m in scorer.members] == [[0], [1]]
    assert scorer.info["members"] == 2 and len(scorer.info["best_meta_epoch"]) == 2
    assert {h["member"] for h in scorer.history} == {0, 1}
    held_out = scorer.score_held_out(validation.images, validation.source_index)
    low, high = scorer._features(validation.images)
    for member in scorer.members:  # each row: exactly the output of the member that left its support out
        rows = np.flatnonzero(np.isin(validation.source_index, member.held_out))
        own = scorer._member_outputs(member, low[torch.from_numpy(rows)], high[torch.from_numpy(rows)])
        np.testing.assert_allclose(held_out["pred_score"][rows], own["pred_score"].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(held_out["anomaly_map"][rows], own["anomaly_map"].numpy(), rtol=1e-5, atol=1e-6)
    # Rows made from no support (labelled defect views): the members' mean, as score() gives.
    defect_views = scorer.score_held_out(validation.images[:2], [-1, -1])
    np.testing.assert_allclose(defect_views["pred_score"], scorer.score(validation.images[:2])["pred_score"], rtol=1e-6)
    chunked = score_held_out_in_chunks(scorer, validation.images, validation.source_index, chunk_size=3)
    np.testing.assert_allclose(chunked["pred_score"], held_out["pred_score"], rtol=1e-5, atol=1e-6)


def test_new_images_get_the_members_mean_map(cross_fitted):
    scorer, validation = cross_fitted
    low, high = scorer._features(validation.images)
    maps = torch.stack([scorer._member_outputs(m, low, high)["anomaly_map"] for m in scorer.members]).mean(0)
    scored = scorer.score(validation.images)
    np.testing.assert_allclose(scored["anomaly_map"], maps.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scored["pred_score"], maps.flatten(1).amax(1).numpy(), rtol=1e-5, atol=1e-6)
    # Two members trained on different supports are different models.
    first, second = (m.model.state_dict() for m in scorer.members)
    assert any(not torch.equal(first[key], second[key]) for key in first)


def test_a_cross_fitted_scorer_round_trips(cross_fitted, tmp_path):
    scorer, validation = cross_fitted
    scorer.save(tmp_path / "dfd")
    loaded = DFDScorer.load(tmp_path / "dfd", device="cpu")
    assert [m.held_out for m in loaded.members] == [[0], [1]] and loaded.cross_fitted
    np.testing.assert_allclose(loaded.score(validation.images)["pred_score"], scorer.score(validation.images)["pred_score"], rtol=1e-6)


def test_a_version_1_model_folder_still_loads(cross_fitted, tmp_path):
    """Models saved before cross-fitting (one model at the folder's top level) load as one member."""
    scorer, validation = cross_fitted
    member = scorer.members[0]
    folder = tmp_path / "old"
    save_dfd(folder, member.model, scorer.train_config, member.stats, extra={})
    payload = {"format_version": 1, "name": "dfd", "features": json.loads(json.dumps(scorer.features.__dict__)),
               "threshold": scorer.threshold, "history": [], "info": {}}
    (folder / SCORER_CONFIG_FILE).write_text(json.dumps(payload))
    loaded = DFDScorer.load(folder, device="cpu")
    assert len(loaded.members) == 1 and not loaded.cross_fitted
    low, high = scorer._features(validation.images)
    expected = scorer._member_outputs(member, low, high)["pred_score"].numpy()
    np.testing.assert_allclose(loaded.score(validation.images)["pred_score"], expected, rtol=1e-5, atol=1e-6)


def test_a_member_folder_outside_the_model_folder_is_refused(cross_fitted, tmp_path):
    scorer, _ = cross_fitted
    scorer.save(tmp_path / "dfd")
    payload = json.loads((tmp_path / "dfd" / SCORER_CONFIG_FILE).read_text())
    payload["members"][0]["folder"] = "../elsewhere"
    (tmp_path / "dfd" / SCORER_CONFIG_FILE).write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="outside the model folder"):
        DFDScorer.load(tmp_path / "dfd", device="cpu")


def test_the_default_scores_new_images_with_a_member_trained_on_every_support(with_full_member):
    scorer, validation = with_full_member
    assert [m.held_out for m in scorer.members] == [[0], [1], []] and scorer.cross_fitted
    assert [m.held_out for m in scorer.scoring_members] == [[]]
    low, high = scorer._features(validation.images)
    full = scorer._member_outputs(scorer.members[2], low, high)
    np.testing.assert_allclose(scorer.score(validation.images)["pred_score"], full["pred_score"].numpy(), rtol=1e-6)
    held_out = scorer.score_held_out(validation.images, validation.source_index)
    for member in scorer.members[:2]:  # validation rows: still the validator that never saw them
        rows = np.flatnonzero(np.isin(validation.source_index, member.held_out))
        own = scorer._member_outputs(member, low[torch.from_numpy(rows)], high[torch.from_numpy(rows)])
        np.testing.assert_allclose(held_out["pred_score"][rows], own["pred_score"].numpy(), rtol=1e-5, atol=1e-6)
    assert len(scorer.info["best_meta_epoch"]) == 3 and {h["member"] for h in scorer.history} == {0, 1, 2}


def test_an_unknown_cross_fit_scoring_is_refused(datasets):
    with pytest.raises(ValueError, match="cross_fit_scoring"):
        _cross_fit(datasets, "average")


def test_a_validation_made_from_unseen_good_images_needs_no_cross_fit(datasets):
    rng = np.random.default_rng(4)
    train, validation = datasets.pseudo_anomaly_set(rng, 8, 32), datasets.pseudo_anomaly_set(rng, 8, 32)
    validation.source_index = np.full(len(validation), -1, np.int64)  # no row comes from a support
    features = FeatureConfig(pretrain_dim=16, target_dim=16, image_size=32, batch_size=8)
    config = DFDTrainConfig(meta_epochs=1, epochs=1, gaussian_hidden=16, seed=0)
    scorer = DFDScorer.fit(train, validation, features=features, train_config=config, cross_fit_folds=2,
                           device="cpu", progress=False)
    assert not scorer.cross_fitted and len(scorer.members) == 1
    held_out = scorer.score_held_out(validation.images, validation.source_index)
    np.testing.assert_allclose(held_out["pred_score"], scorer.score(validation.images)["pred_score"], rtol=1e-6)


def test_members_keep_the_path_weights_they_were_selected_with(datasets, tmp_path):
    rng = np.random.default_rng(5)
    train, validation = datasets.pseudo_anomaly_set(rng, 8, 32), datasets.pseudo_anomaly_set(rng, 8, 32)
    features = FeatureConfig(pretrain_dim=16, target_dim=16, image_size=32, batch_size=8)
    config = DFDTrainConfig(meta_epochs=1, epochs=1, gaussian_hidden=16, seed=0, fusion_weights=(1.0, 0.0),
                            score_weights=(0.0, 1.0))
    scorer = DFDScorer.fit(train, validation, features=features, train_config=config, device="cpu", progress=False)
    member = scorer.members[0]
    assert (member.map_weights, member.score_weights) == ((1.0, 0.0), (0.0, 1.0))
    assert scorer.info["path_weights"] == [{"map": [1.0, 0.0], "score": [0.0, 1.0]}]
    scorer.save(tmp_path / "dfd")
    loaded = DFDScorer.load(tmp_path / "dfd", device="cpu")
    assert [(m.map_weights, m.score_weights) for m in loaded.members] == [((1.0, 0.0), (0.0, 1.0))]
    scored, reloaded = scorer.score(validation.images), loaded.score(validation.images)
    np.testing.assert_allclose(reloaded["anomaly_map"], scored["anomaly_map"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(reloaded["pred_score"], scored["pred_score"], rtol=1e-6, atol=1e-6)
    low, high = scorer._features(validation.images)
    perlin, gaussian = compute_path_maps(member.model, low, high, scorer._generator)
    generator, stats = scorer._generator, member.stats
    np.testing.assert_allclose(scored["anomaly_map"], generator.fuse(perlin, gaussian, stats, (1.0, 0.0)).numpy(),
                               rtol=1e-5, atol=1e-5)
    image_map = generator.fuse(perlin, gaussian, stats, (0.0, 1.0))
    np.testing.assert_allclose(scored["pred_score"], image_map.flatten(1).amax(1).numpy(), rtol=1e-5, atol=1e-5)


def test_cached_features_are_kept_in_the_precision_of_the_feature_pass():
    """A bfloat16 feature pass ends in bfloat16 values: the cache keeps them as bfloat16, equal to
    the float32 copy the pass returns; a float32 pass is kept in float32."""
    from fsad_pipeline.scoring.dfd_scorer import _cache_dtype

    images = np.random.default_rng(2).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    low_precision = FeatureConfig(pretrained=False, pretrain_dim=8, target_dim=8, image_size=32, precision="bf16")
    assert _cache_dtype(low_precision, torch.device("cpu")) == torch.bfloat16
    assert _cache_dtype(FeatureConfig(precision="fp32"), torch.device("cpu")) == torch.float32
    extractor = low_precision.build_extractor()
    as_float = extract_features(extractor, images, image_size=32, progress=False)
    as_bf16 = extract_features(extractor, images, image_size=32, progress=False, dtype=torch.bfloat16)
    for full, half in zip(as_float, as_bf16):
        assert half.dtype == torch.bfloat16 and torch.equal(half.float(), full)
