"""Tests of DFD training, scoring and persistence on tiny synthetic cached features."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fsad_pipeline.models.anomaly_map import DFDAnomalyMapGenerator, NormalizationStats
from fsad_pipeline.models.dfd import DFDModel
from fsad_pipeline.models.dfd_training import (
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    CachedFeatures,
    DFDTrainConfig,
    ValidationFeatures,
    batch_loss,
    load_dfd,
    save_dfd,
    score_dfd,
    train_dfd,
)

DIM = 16
GRID = (4, 4)
IMAGE = 16
SHIFT = 3.0


def _make_split(count: int, seed: int) -> dict[str, torch.Tensor]:
    """Random normal features; every other sample gets a 2×2-patch defect shifted by +SHIFT."""
    generator = torch.Generator().manual_seed(seed)
    normal_low = torch.randn(count, DIM, *GRID, generator=generator)
    normal_high = torch.randn(count, DIM, *GRID, generator=generator)
    patch_masks = torch.zeros(count, *GRID)
    labels = torch.zeros(count)
    for index in range(0, count, 2):
        row, col = torch.randint(0, GRID[0] - 1, (2,), generator=generator).tolist()
        patch_masks[index, row : row + 2, col : col + 2] = 1.0
        labels[index] = 1.0
    scale = IMAGE // GRID[0]
    masks = patch_masks.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return {
        "normal_low": normal_low,
        "normal_high": normal_high,
        "aug_low": normal_low + SHIFT * patch_masks[:, None],
        "aug_high": normal_high + SHIFT * patch_masks[:, None],
        "masks": masks,
        "labels": labels,
    }


def _train_features(seed: int = 0, count: int = 16) -> CachedFeatures:
    return CachedFeatures(**_make_split(count, seed))


def _validation(seed: int = 1, count: int = 16) -> ValidationFeatures:
    split = _make_split(count, seed)
    return ValidationFeatures(split["aug_low"], split["aug_high"], split["masks"], split["labels"])


def _config(**overrides: object) -> DFDTrainConfig:
    values: dict[str, object] = {
        "meta_epochs": 2,
        "epochs": 1,
        "batch_size": 8,
        "gaussian_hidden": 32,
        "map_sigma": 1.0,
        "lr_adaptor": 5e-3,
        "lr_gaussian": 2e-3,
        "lr_perlin": 1e-3,
    }
    values.update(overrides)
    return DFDTrainConfig(**values)  # type: ignore[arg-type]


def test_config_defaults_match_reference() -> None:
    config = DFDTrainConfig()
    assert (config.meta_epochs, config.epochs, config.batch_size) == (20, 4, 8)
    assert (config.lr_adaptor, config.lr_gaussian, config.lr_perlin) == (5e-4, 2e-4, 1e-4)
    assert config.margin == 0.5 and config.noise_std == 0.015 and config.gaussian_hidden == 1024
    assert config.cosine_t_max == 76
    assert config.eta_min_ratio * config.lr_perlin == pytest.approx(4e-5)
    assert DFDTrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError):
        DFDTrainConfig.from_dict({"not_a_field": 1})


def test_cached_features_validate_shapes() -> None:
    split = _make_split(4, 0)
    split["aug_high"] = split["aug_high"][:, :, :2]
    with pytest.raises(ValueError):
        CachedFeatures(**split)
    split = _make_split(4, 0)
    split["labels"] = split["labels"][:3]
    with pytest.raises(ValueError):
        CachedFeatures(**split)


def test_batch_loss_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    config = _config()
    model = DFDModel(DIM, GRID, config.model_config()).train()
    batch = _make_split(4, 0)
    loss, parts = batch_loss(model, batch, config, torch.Generator().manual_seed(0))
    assert set(parts) == {"total", "gaussian", "perlin", "similarity"}
    expected_total = parts["gaussian"] + parts["perlin"] + parts["similarity"]
    assert parts["total"] == pytest.approx(expected_total, rel=1e-5)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_training_is_deterministic() -> None:
    train = _train_features()
    first = train_dfd(train, _config(), progress=False)
    second = train_dfd(train, _config(), progress=False)
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert first_state.keys() == second_state.keys()
    for key in first_state:
        assert torch.equal(first_state[key], second_state[key]), key
    assert first.stats == second.stats
    third = train_dfd(train, _config(seed=1), progress=False)
    assert not torch.equal(third.model.adaptor.linear.weight, first.model.adaptor.linear.weight)


def test_tiny_training_separates_synthetic_anomalies() -> None:
    result = train_dfd(_train_features(), _config(), validation=_validation(), progress=False)
    assert len(result.history) == 2
    assert not result.model.training
    best = result.history[result.best_meta_epoch]
    assert best["image_auroc"] > 0.9
    assert best["pixel_auroc"] > 0.9
    assert best["selection_score"] == pytest.approx(best["image_auroc"] + best["pixel_auroc"])
    assert all(math.isfinite(record["loss"]) for record in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.stats.perlin_max > result.stats.perlin_min
    assert result.train_seconds > 0


def test_scheduler_steps_once_per_inner_epoch() -> None:
    config = _config(meta_epochs=3, epochs=2)
    result = train_dfd(_train_features(count=4), config, progress=False)
    eta_min = config.eta_min_ratio * config.lr_perlin
    t_max = config.cosine_t_max  # 4
    for meta_epoch, record in enumerate(result.history):
        steps = (meta_epoch + 1) * config.epochs
        cosine = (1 + math.cos(math.pi * steps / t_max)) / 2
        expected = eta_min + (config.lr_perlin - eta_min) * cosine
        assert record["lr_perlin"] == pytest.approx(expected)


def test_single_class_validation_falls_back_to_last_epoch() -> None:
    split = _make_split(6, 3)
    normal_only = ValidationFeatures(
        split["normal_low"], split["normal_high"], torch.zeros(6, IMAGE, IMAGE), torch.zeros(6)
    )
    result = train_dfd(_train_features(), _config(), validation=normal_only, progress=False)
    assert result.best_meta_epoch == 1
    assert result.history[0]["image_auroc"] is None and result.history[0]["pixel_auroc"] is None


def test_without_validation_stats_come_from_training_features() -> None:
    result = train_dfd(_train_features(), _config(), progress=False)
    assert result.best_meta_epoch == 1
    train = _train_features()
    scores = score_dfd(
        result.model, train.normal_low, train.normal_high, result.map_generator, result.stats
    )
    assert scores["anomaly_map"].shape == (len(train), IMAGE, IMAGE)
    assert scores["perlin_map"].min().item() == pytest.approx(result.stats.perlin_min, abs=1e-5)
    assert scores["gaussian_map"].max().item() == pytest.approx(result.stats.gaussian_max, abs=1e-5)


def test_score_dfd_shapes_and_batching() -> None:
    result = train_dfd(_train_features(), _config(meta_epochs=1), progress=False)
    validation = _validation(count=5)
    generator = DFDAnomalyMapGenerator((IMAGE, IMAGE), sigma=1.0)
    full = score_dfd(result.model, validation.low, validation.high, generator, result.stats)
    batched = score_dfd(
        result.model, validation.low, validation.high, generator, result.stats, batch_size=2
    )
    assert full["anomaly_map"].shape == (5, IMAGE, IMAGE)
    assert full["pred_score"].shape == (5,)
    for key in ("anomaly_map", "pred_score", "perlin_map", "gaussian_map"):
        torch.testing.assert_close(full[key], batched[key])


def test_save_load_round_trip(tmp_path: Path) -> None:
    config = _config(meta_epochs=1)
    result = train_dfd(_train_features(), config, validation=_validation(), progress=False)
    extra = {"backbone": "tiny", "image_size": [IMAGE, IMAGE]}
    save_dfd(tmp_path / "dfd", result.model, result.config, result.stats, extra)
    assert (tmp_path / "dfd" / WEIGHTS_FILENAME).is_file()
    assert (tmp_path / "dfd" / CONFIG_FILENAME).is_file()
    model, loaded_config, stats, loaded_extra = load_dfd(tmp_path / "dfd")
    assert loaded_config == result.config
    assert stats == result.stats
    assert loaded_extra == extra
    assert not model.training
    validation = _validation(seed=7, count=4)
    generator = DFDAnomalyMapGenerator((IMAGE, IMAGE), sigma=config.map_sigma)
    before = score_dfd(result.model, validation.low, validation.high, generator, result.stats)
    after = score_dfd(model, validation.low, validation.high, generator, stats)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert isinstance(stats, NormalizationStats)


def test_patience_stops_when_validation_stops_improving() -> None:
    # A criterion that peaks at meta-epoch 1 and only falls after: with patience 2 training ends
    # after meta-epoch 3 (two epochs without a better score) and keeps meta-epoch 1's weights.
    calls = iter([0.5, 0.9, 0.8, 0.7, 0.95, 0.99])
    result = train_dfd(
        _train_features(), _config(meta_epochs=6, patience=2), validation=_validation(),
        progress=False, score_fn=lambda *_: next(calls),
    )
    assert len(result.history) == 4
    assert result.best_meta_epoch == 1
    assert [r["early_stop"] for r in result.history] == [False, False, False, True]


def test_without_patience_every_meta_epoch_runs() -> None:
    calls = iter([0.9, 0.5, 0.4])
    result = train_dfd(
        _train_features(), _config(meta_epochs=3), validation=_validation(), progress=False, score_fn=lambda *_: next(calls)
    )
    assert len(result.history) == 3 and result.best_meta_epoch == 0
    with pytest.raises(ValueError, match="patience"):
        _config(patience=0)


def test_gaussian_token_fraction_feeds_a_random_subset_of_tokens() -> None:
    torch.manual_seed(0)
    config = _config(gaussian_token_fraction=0.25)
    model = DFDModel(DIM, GRID, config.model_config()).train()
    batch = _make_split(4, 0)
    seen: list[int] = []
    hook = model.gaussian.register_forward_hook(lambda _m, args, _out: seen.append(int(args[0].shape[0])))
    batch_loss(model, batch, config, torch.Generator().manual_seed(0))
    hook.remove()
    tokens = 4 * GRID[0] * GRID[1]  # per path: real + noisy copies of a quarter of the tokens
    assert seen == [2 * round(0.25 * tokens)] * 2
    with pytest.raises(ValueError, match="gaussian_token_fraction"):
        _config(gaussian_token_fraction=0.0)
    # The full fraction is the reference loss, unchanged.
    full = _config()
    loss_a, _ = batch_loss(model, batch, full, torch.Generator().manual_seed(3))
    loss_b, _ = batch_loss(model, batch, _config(gaussian_token_fraction=1.0), torch.Generator().manual_seed(3))
    assert torch.equal(loss_a, loss_b)
