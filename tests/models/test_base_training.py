"""Tests for the base training loop (fsad_pipeline.models.base_training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsad_pipeline.models.base_training import BaseTrainingConfig, PairAugmentation, train_registration_encoder
from fsad_pipeline.models.registration import EncoderConfig
from fsad_pipeline.synthesis.textures import TextureBank


def _category(seed: int, count: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = []
    for _ in range(count):
        base = 0.5 + 0.3 * np.sin(xx * (0.4 + 0.2 * seed) + rng.uniform(0, 1)) * np.cos(yy * 0.5)
        image = np.stack([base, base * 0.9, base * (0.6 + 0.2 * seed)], axis=2) + rng.normal(0, 0.02, (size, size, 3))
        images.append(np.clip(image * 255, 0, 255).astype(np.uint8))
    return np.stack(images)


def _config(**overrides) -> BaseTrainingConfig:
    options = dict(
        image_size=32, epochs=2, batch_size=4, views_per_image=2, lr=1e-3, progress=False, num_threads=1,
        validation={"support_images": 2, "anomalies_per_image": 1, "foreground": "none", "feature_dim": 16},
    )
    return BaseTrainingConfig.from_dict({**options, **overrides})


@pytest.fixture(scope="module")
def categories():
    return {
        name: {"train": _category(seed, 5), "validation": _category(seed + 10, 2)}
        for seed, name in enumerate(("alpha", "beta"))
    }


def _train(categories, **overrides):
    textures = TextureBank.from_sources(None, use_skimage=False, gimp_dirs=(), procedural=True)
    return train_registration_encoder(categories, EncoderConfig(), _config(**overrides), textures, name="tiny")


def test_training_is_deterministic_and_selects_on_validation(categories):
    first, history = _train(categories)
    second, _ = _train(categories)
    for key, value in first.encoder.state_dict().items():
        torch.testing.assert_close(value, second.encoder.state_dict()[key], rtol=0, atol=0, msg=key)
    assert [h["meta_epoch"] for h in history] == [0, 1, 2]
    assert np.isnan(history[0]["loss"]) and all(-1.0 <= h["loss"] <= 1.0 for h in history[1:])
    assert set(history[0]["val_per_category"]) == {"alpha", "beta"}
    scores = [h["val_score"] for h in history]
    assert first.training["selected_epoch"] == int(np.argmax(scores))
    assert first.training["categories"] == {"alpha": {"train": 5, "validation": 2}, "beta": {"train": 5, "validation": 2}}


def test_training_moves_the_registration_away_from_identity(categories):
    trained, history = _train(categories, validation={"include_initial": False, "support_images": 2,
                                                      "anomalies_per_image": 1, "foreground": "none", "feature_dim": 16})
    assert trained.training["selected_epoch"] >= 1
    moved = [stn.head.weight.abs().max().item() for stn in trained.encoder.stns.values()]
    assert max(moved) > 0  # the last STN layer started at exactly zero


def test_pair_augmentation_keeps_shape_and_changes_the_image():
    image = _category(0, 1, 24)[0]
    view = PairAugmentation()(image, np.random.default_rng(0))
    assert view.shape == image.shape and view.dtype == np.uint8
    assert np.abs(view.astype(int) - image.astype(int)).mean() > 1
