import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsad_pipeline.models.defect_classifier import (
    UNKNOWN,
    PooledEmbedder,
    PretrainConfig,
    PrototypeClassifier,
    ResidualEncoder,
    calibrate_unknown_threshold,
    fine_tune,
    info_nce_loss,
    paired_residuals,
    pretrain,
    residual_features,
)
from fsad_pipeline.models.memory_bank import MemoryBankScorer, NearestNeighbourIndex


def test_residual_features_alignment_with_known_neighbours():
    """Every patch is bank[j] + a small, position-specific offset, so the residual is that offset."""
    channels, height, width = 3, 2, 4
    bank = torch.tensor(
        [[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]]
    )
    generator = torch.Generator().manual_seed(0)
    nearest = torch.randint(0, 4, (2, height, width), generator=generator)
    offsets = torch.rand(2, height, width, channels, generator=generator) - 0.5  # |offset| < 0.5 << 10
    features = (bank[nearest] + offsets).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    for source in (bank, NearestNeighbourIndex(backend="torch").build(bank)):
        residual = residual_features(features, source)
        assert residual.shape == features.shape
        torch.testing.assert_close(residual, offsets.permute(0, 3, 1, 2))
    # a channel-specific check: the residual at (n, :, y, x) is the offset of that very patch
    torch.testing.assert_close(residual[1, :, 1, 2], offsets[1, 1, 2])


def test_residual_features_reuses_a_fitted_memory_bank():
    features = torch.randn(3, 5, 4, 4)
    scorer = MemoryBankScorer(coreset_ratio=None, backend="torch", progress=False).fit(features)
    residual = residual_features(features, scorer)
    assert residual.abs().max() < 1e-5  # every patch is in the bank
    with pytest.raises(ValueError):
        residual_features(torch.randn(1, 6, 4, 4), scorer)


def test_paired_residuals_with_source_index():
    sources = torch.randn(2, 3, 4, 4)
    synthetic = sources[[1, 0, 1]] + 1.0
    torch.testing.assert_close(paired_residuals(synthetic, sources, [1, 0, 1]), torch.ones(3, 3, 4, 4))
    with pytest.raises(ValueError):
        paired_residuals(synthetic, sources)


def test_info_nce_matches_manual_computation():
    queries = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # normalised inside the loss
    labels = torch.tensor([0, 1, 1])
    temperature = 0.5
    expected = 0.0
    unit_keys = [(1.0, 0.0), (0.0, 1.0)]
    for (qx, qy), label in zip([(1.0, 0.0), (0.6, 0.8), (0.0, 1.0)], labels.tolist()):
        logits = [(qx * kx + qy * ky) / temperature for kx, ky in unit_keys]
        expected += -logits[label] + math.log(sum(math.exp(v) for v in logits))
    expected /= 3
    assert info_nce_loss(queries, keys, labels, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_encoder_shape_norm_and_permutation_invariance():
    encoder = ResidualEncoder(8, hidden_channels=(16, 8), embed_dim=5).eval()
    maps = torch.randn(3, 8, 6, 6)
    embedding = encoder(maps)
    assert embedding.shape == (3, 5)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(3))
    shuffled = maps.flatten(2)[:, :, torch.randperm(36)].reshape(3, 8, 6, 6)
    torch.testing.assert_close(encoder(shuffled), embedding)  # 1x1 convs + pooling: position-free


def _separable(n_per_class: int, classes: int = 3, channels: int = 6, seed: int = 0):
    """Residual maps whose defect patch has a class-specific direction at a random place."""
    rng = np.random.default_rng(seed)
    directions = np.eye(channels)[:classes] * 3.0
    maps, labels = [], []
    for cls in range(classes):
        for _ in range(n_per_class):
            grid = rng.normal(0, 0.1, (channels, 6, 6))
            y, x = rng.integers(0, 5, size=2)
            grid[:, y : y + 2, x : x + 2] += directions[cls][:, None, None] * rng.uniform(0.7, 1.3)
            maps.append(grid)
            labels.append(cls)
    return torch.tensor(np.stack(maps), dtype=torch.float32), np.array(labels)


@pytest.mark.parametrize("kind", ["pooled", "encoder"])
def test_prototype_classifier_separable_is_perfect(kind):
    torch.manual_seed(0)  # before the encoder is built: its random weights must not depend on test collection order
    embedder = PooledEmbedder(pooling="meanmax") if kind == "pooled" else ResidualEncoder(6, hidden_channels=(16, 8), embed_dim=8)
    maps, labels = _separable(12)
    names = np.array(["crack", "hole", "stain"])[labels]
    support = np.r_[0:2, 12:14, 24:26]
    test = np.setdiff1d(np.arange(len(labels)), support)
    classifier = PrototypeClassifier(embedder, open_set=False).fit(maps[support], names[support].tolist())
    prediction = classifier.predict(maps[test])
    assert prediction.pred_type == names[test].tolist()
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert all(r != p for r, p in zip(prediction.runner_up, prediction.pred_type))
    assert np.all(prediction.pred_probability >= 1.0 / 3)


def test_unknown_rule_hand_made():
    # two classes of two shots each, at 0 and 90 degrees (+-10 degrees)
    angles = np.deg2rad([-10, 10, 80, 100])
    embeddings = torch.tensor(np.c_[np.cos(angles), np.sin(angles)], dtype=torch.float32)
    threshold, info = calibrate_unknown_threshold(embeddings, [0, 0, 1, 1])
    genuine = math.cos(np.deg2rad(20))  # a shot against the other shot of its class
    # a shot against the other class's prototype (at 90 or 0 degrees): 100, 80, 80, 100 degrees apart
    class_out = [math.cos(np.deg2rad(a)) for a in (100, 80, 80, 100)]
    assert info["genuine"] == pytest.approx([genuine] * 4, abs=1e-6)
    assert info["class_out"] == pytest.approx(class_out, abs=1e-6)
    assert threshold == pytest.approx(min(genuine, 0.5 * (genuine + np.mean(class_out))), abs=1e-6)
    # one shot per class: the mutual cosine of the two shots
    threshold_1, info_1 = calibrate_unknown_threshold(embeddings[[0, 2]], [0, 1])
    assert threshold_1 == pytest.approx(math.cos(np.deg2rad(90)), abs=1e-6)
    assert "one shot" in info_1["rule"]
    # one shot of one class: nothing to calibrate on
    assert calibrate_unknown_threshold(embeddings[:1], [0])[0] is None


def test_unknown_flags_a_new_defect_kind():
    maps, labels = _separable(6, classes=3)
    names = np.array(["crack", "hole", "stain"])[labels]
    known = labels < 2
    classifier = PrototypeClassifier(PooledEmbedder(pooling="max")).fit(maps[known], names[known].tolist())
    assert classifier.unknown_threshold is not None
    new_kind = classifier.predict(maps[~known])
    assert new_kind.pred_type == [UNKNOWN] * int((~known).sum())
    assert set(new_kind.closed_set_type) <= {"crack", "hole"}  # closed-set argmax is still reported
    known_again = classifier.predict(maps[known])
    assert not known_again.is_unknown.any()


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    maps, labels = _separable(4)
    encoder = ResidualEncoder(6, hidden_channels=(12, 8), embed_dim=4)
    pretrain(encoder, maps, labels, PretrainConfig(n_way=3, n_query=6, max_episodes=5, seed=0), progress=False)
    names = [f"type{label}" for label in labels]
    classifier = PrototypeClassifier(encoder).fit(maps, names)
    before = classifier.predict(maps)
    loaded = PrototypeClassifier.load(classifier.save(tmp_path / "clf"))
    after = loaded.predict(maps)
    assert after.pred_type == before.pred_type and after.runner_up == before.runner_up
    np.testing.assert_array_equal(after.probabilities, before.probabilities)
    assert loaded.unknown_threshold == classifier.unknown_threshold
    assert list((tmp_path / "clf").iterdir()) and all(p.suffix in {".json", ".safetensors"} for p in (tmp_path / "clf").iterdir())


def test_pretrain_learns_and_stops_on_smoothed_accuracy():
    torch.manual_seed(0)
    maps, labels = _separable(10, classes=4, channels=8)
    encoder = ResidualEncoder(8, hidden_channels=(16, 16), embed_dim=8)
    config = PretrainConfig(n_way=4, n_query=12, lr=1e-2, max_episodes=300, stop_accuracy=0.9, stop_window=5, seed=0)
    result = pretrain(encoder, maps, labels, config, progress=False)
    assert result.stopped_early and result.steps < 300
    assert np.mean([h["accuracy"] for h in result.history[-5:]]) > 0.9
    assert not encoder.training


def test_pretrain_is_seeded():
    maps, labels = _separable(5)
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        encoder = ResidualEncoder(6, hidden_channels=(8,), embed_dim=4)
        pretrain(encoder, maps, labels, PretrainConfig(n_way=3, n_query=4, max_episodes=4, seed=7), progress=False)
        outputs.append(encoder(maps))
    torch.testing.assert_close(outputs[0], outputs[1])


def test_fine_tune_skips_with_one_shot_and_trains_with_two():
    maps, labels = _separable(2)
    encoder = ResidualEncoder(6, hidden_channels=(8,), embed_dim=4)
    first = np.r_[0, 2, 4]
    skipped = fine_tune(encoder, maps[first], labels[first], epochs=3, progress=False)
    assert skipped.skipped and skipped.steps == 0
    running_mean = encoder.body[1].running_mean.clone()
    trained = fine_tune(encoder, maps, labels, epochs=3, progress=False)
    assert not trained.skipped and trained.steps == 3 * 6  # 3 classes x 2 ordered pairs x 3 epochs
    torch.testing.assert_close(encoder.body[1].running_mean, running_mean)  # BatchNorm frozen


def test_classifier_rejects_bad_inputs():
    with pytest.raises(ValueError):
        PrototypeClassifier(PooledEmbedder(), input_kind="pixels")
    with pytest.raises(ValueError):
        PrototypeClassifier(PooledEmbedder()).fit(torch.zeros(2, 3, 2, 2), ["a"])
    with pytest.raises(RuntimeError):
        PrototypeClassifier(PooledEmbedder()).predict(torch.zeros(1, 3, 2, 2))
    embeddings = F.normalize(torch.randn(4, 3), dim=1)
    assert calibrate_unknown_threshold(embeddings, [0, 1, 2, 3])[0] is not None
