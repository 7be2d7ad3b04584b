"""Tests of DFD training, scoring and persistence on tiny synthetic cached features."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fsad_pipeline.models.anomaly_map import DFDAnomalyMapGenerator, NormalizationStats
from fsad_pipeline.models.dfd import DFDModel, gaussian_loss
from fsad_pipeline.models.dfd_training import (
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    CachedFeatures,
    DFDTrainConfig,
    ValidationFeatures,
    batch_loss,
    compute_path_maps,
    gaussian_collapse_loss,
    load_dfd,
    choose_path_weights,
    configured_path_weights,
    path_weight_candidates,
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


def test_bfloat16_autocast_keeps_the_loss_and_float32_gradients() -> None:
    """Mixed precision: the adaptor and the Perlin discriminator under bfloat16, the rest float32."""
    config = _config()
    with pytest.raises(ValueError, match="precision"):
        _config(precision="fp16")
    batch = _make_split(4, 0)
    losses = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = DFDModel(DIM, GRID, config.model_config()).train()
        dtypes: list[torch.dtype] = []
        hook = model.gaussian.register_forward_hook(lambda _m, args, _out: dtypes.append(args[0].dtype))
        loss, parts = batch_loss(model, batch, config, torch.Generator().manual_seed(0), dtype)
        hook.remove()
        assert loss.dtype == torch.float32 and dtypes == [torch.float32, torch.float32]
        loss.backward()
        for name, parameter in model.named_parameters():
            assert parameter.dtype == torch.float32 and parameter.grad.dtype == torch.float32, name
            assert parameter.grad.abs().sum() > 0, name
        losses[dtype] = parts
    for name in ("gaussian", "perlin", "similarity"):
        assert losses[torch.bfloat16][name] == pytest.approx(losses[None][name], rel=0.05, abs=0.02), name


def test_training_under_bfloat16_learns_the_defects() -> None:
    train, validation = _train_features(), _validation()
    result = train_dfd(train, _config(precision="bf16", meta_epochs=3), validation=validation, progress=False)
    assert all(value.dtype == torch.float32 for value in result.model.state_dict().values() if value.is_floating_point())
    assert result.history[result.best_meta_epoch]["image_auroc"] >= 0.9


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


def test_the_collapse_value_is_the_loss_of_a_gaussian_discriminator_blind_to_the_noise() -> None:
    config = _config(fusion_weights="auto")
    assert gaussian_collapse_loss(config) == pytest.approx(2.0)  # 2 x margin 0.5, two paths
    for constant in (-0.5, 0.0, 0.3, 0.5):  # the same output for f and f + noise, anywhere in [-m, m]
        same = torch.full((10,), constant)
        assert float(gaussian_loss(same, same, 0.5)) == pytest.approx(1.0)
    outside = torch.full((10,), 0.8)
    assert float(gaussian_loss(outside, outside, 0.5)) > 1.0


def test_auto_path_weights_choose_between_the_reference_and_the_perlin_discriminator_alone() -> None:
    auto = _config(fusion_weights="auto")
    assert path_weight_candidates(auto) == [(0.5, 0.5), (1.0, 0.0)]  # the reference first: it wins ties
    assert path_weight_candidates(_config(fusion_weights=(0.3, 0.7))) == []  # fixed weights: no choice
    assert configured_path_weights(auto) == ((0.5, 0.5), (0.5, 0.5))
    assert configured_path_weights(_config(fusion_weights=(0.3, 0.7))) == ((0.3, 0.7), (0.3, 0.7))
    assert configured_path_weights(_config(fusion_weights=(1, 0), score_weights=(0, 1))) == ((1.0, 0.0), (0.0, 1.0))
    with pytest.raises(ValueError, match="fusion_weights"):
        _config(fusion_weights="perlin")
    assert configured_path_weights(_config(fusion_weights="auto", score_weights=(0.5, 0.5))) == ((0.5, 0.5),) * 2
    assert DFDTrainConfig.from_dict(auto.to_dict()).fusion_weights == "auto"
    fixed = _config(fusion_weights=(1.0, 0.0), score_weights=(0.5, 0.5))
    assert DFDTrainConfig.from_dict(fixed.to_dict()) == fixed


def _path_maps_where(perlin_signal: float, gaussian_signal: float):
    """Validation maps of 8 images (4 anomalous, a 4x4 defect square) in which each path carries
    the defect with the given strength on top of the same noise; a constant 0..1 range."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(8, IMAGE, IMAGE)
    masks[:4, 4:8, 4:8] = 1.0
    labels = torch.tensor([1.0] * 4 + [0.0] * 4)
    perlin = torch.rand(8, IMAGE, IMAGE, generator=generator) + perlin_signal * masks
    gaussian = torch.rand(8, IMAGE, IMAGE, generator=generator) + gaussian_signal * masks
    validation = ValidationFeatures(torch.zeros(8, DIM, *GRID), torch.zeros(8, DIM, *GRID), masks, labels)
    stats = NormalizationStats(0.0, 1.0 + perlin_signal, 0.0, 1.0 + gaussian_signal)
    return DFDAnomalyMapGenerator((IMAGE, IMAGE)), perlin, gaussian, stats, validation


def test_the_validation_drops_a_gaussian_path_that_only_adds_noise() -> None:
    generator, perlin, gaussian, stats, validation = _path_maps_where(perlin_signal=3.0, gaussian_signal=0.0)
    candidates = [(0.5, 0.5), (1.0, 0.0)]
    map_weights, score_weights, metrics = choose_path_weights(generator, perlin, gaussian, stats, validation, candidates)
    assert map_weights == (1.0, 0.0)  # the noise path blurs the map: Perlin alone locates better
    assert metrics["pixel_auroc"] > 0.99
    # Both separate the images perfectly: the tie keeps the reference for the image score.
    assert score_weights == (0.5, 0.5) and metrics["image_auroc"] == 1.0
    # A single candidate is taken as it is.
    assert choose_path_weights(generator, perlin, gaussian, stats, validation, [(0.5, 0.5)])[:2] == ((0.5, 0.5),) * 2
    # Fixed image-score weights: only the map is chosen.
    map_weights, score_weights, metrics = choose_path_weights(
        generator, perlin, gaussian, stats, validation, candidates, score_weights=(0.0, 1.0)
    )
    assert (map_weights, score_weights) == ((1.0, 0.0), (0.0, 1.0))
    assert metrics["image_auroc"] < 1.0  # the Gaussian-only map carries no defect: its own image AUROC


def test_the_validation_keeps_the_reference_when_both_paths_carry_the_defect() -> None:
    generator, perlin, gaussian, stats, validation = _path_maps_where(perlin_signal=0.3, gaussian_signal=0.3)
    map_weights, score_weights, _ = choose_path_weights(
        generator, perlin, gaussian, stats, validation, [(0.5, 0.5), (1.0, 0.0)]
    )
    assert map_weights == (0.5, 0.5)  # averaging two independent noisy views of the defect locates it better


def test_a_model_scores_images_and_maps_with_the_weights_its_meta_epoch_was_selected_with() -> None:
    validation = _validation()
    result = train_dfd(_train_features(), _config(fusion_weights="auto"), validation=validation, progress=False)
    best = result.history[result.best_meta_epoch]
    map_weights, score_weights = tuple(best["map_weights"]), tuple(best["score_weights"])
    assert {map_weights, score_weights} <= {(0.5, 0.5), (1.0, 0.0)}
    assert result.config.fusion_weights == map_weights and result.config.score_weights == score_weights
    scored = score_dfd(result.model, validation.low, validation.high, result.map_generator, result.stats)
    perlin, gaussian = compute_path_maps(result.model, validation.low, validation.high, result.map_generator)
    generator = result.map_generator
    torch.testing.assert_close(scored["anomaly_map"], generator.fuse(perlin, gaussian, result.stats, map_weights))
    torch.testing.assert_close(
        scored["pred_score"], generator.fuse(perlin, gaussian, result.stats, score_weights).flatten(1).amax(1)
    )
    # Fixed weights are never changed, and without a validation "auto" keeps the reference.
    fixed = train_dfd(_train_features(), _config(fusion_weights=(1.0, 0.0)), validation=validation, progress=False)
    assert fixed.config.fusion_weights == (1.0, 0.0) and fixed.config.score_weights == (1.0, 0.0)
    blind = train_dfd(_train_features(), _config(fusion_weights="auto"), progress=False)
    assert blind.config.fusion_weights == (0.5, 0.5) == blind.config.score_weights
    # The default: the map chosen, the image score fixed at the reference mix.
    maps_only = train_dfd(_train_features(), _config(fusion_weights="auto", score_weights=(0.5, 0.5)),
                          validation=validation, progress=False)
    assert maps_only.config.score_weights == (0.5, 0.5)
    assert all(record["score_weights"] == [0.5, 0.5] for record in maps_only.history)


def test_separate_score_weights_take_the_image_score_from_their_own_map() -> None:
    generator, perlin, gaussian, stats, _ = _path_maps_where(perlin_signal=3.0, gaussian_signal=0.0)
    out = generator.from_path_maps(perlin, gaussian, stats, (1.0, 0.0), (0.0, 1.0))
    torch.testing.assert_close(out["anomaly_map"], generator.fuse(perlin, gaussian, stats, (1.0, 0.0)))
    torch.testing.assert_close(out["pred_score"], generator.fuse(perlin, gaussian, stats, (0.0, 1.0)).flatten(1).amax(1))
    same = generator.from_path_maps(perlin, gaussian, stats, (1.0, 0.0))
    assert same["score_map"] is same["anomaly_map"]


def test_shared_normal_rows_train_the_same_model_as_one_copy_per_sample() -> None:
    """CachedFeatures.normal_index keeps each clean image's features once; training (and the
    statistics frozen on the normal features without a validation) is the same as with a copy
    per sample, and a bfloat16 cache of bfloat16 values trains the same model as a float32 one."""
    split = _make_split(16, 0)
    index = torch.arange(16) // 8  # two clean images, eight samples each
    distinct_low, distinct_high = split["normal_low"][[0, 8]], split["normal_high"][[0, 8]]
    expanded = CachedFeatures(**{**split, "normal_low": distinct_low[index], "normal_high": distinct_high[index]})
    shared = CachedFeatures(**{**split, "normal_low": distinct_low, "normal_high": distinct_high}, normal_index=index)
    assert len(shared) == 16 and shared.normal_low.shape[0] == 2
    first, second = train_dfd(expanded, _config(), progress=False), train_dfd(shared, _config(), progress=False)
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)
    assert first.stats == second.stats
    # features that are bfloat16 values (a bfloat16 feature pass) lose nothing in a bfloat16 cache
    rounded = {k: (v.bfloat16().float() if k in ("normal_low", "normal_high", "aug_low", "aug_high") else v)
               for k, v in split.items()}
    as_float = train_dfd(CachedFeatures(**rounded), _config(), progress=False).model.state_dict()
    halved = CachedFeatures(**{k: (v.bfloat16() if k in ("normal_low", "normal_high", "aug_low", "aug_high") else v)
                               for k, v in rounded.items()})
    as_bf16 = train_dfd(halved, _config(), progress=False).model.state_dict()
    assert all(torch.equal(as_float[key], as_bf16[key]) for key in as_float)
    with pytest.raises(ValueError, match="normal_index"):
        CachedFeatures(**{**split, "normal_low": distinct_low, "normal_high": distinct_high}, normal_index=index + 1)
