import logging

import cv2
import numpy as np
import pytest

from fsad_pipeline.synthesis.foreground import FOREGROUND_METHODS, foreground_mask

SIZE = 96


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


def _disc_scene(object_value: int, background_value: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    disc = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(disc, (SIZE // 2, SIZE // 2), SIZE // 4, 1, -1)
    image = np.where(disc[..., None] > 0, object_value, background_value).astype(np.float64)
    image = image + rng.normal(0, 6, size=(SIZE, SIZE, 3))
    return np.clip(image, 0, 255).astype(np.uint8), disc


def test_auto_on_texture_is_whole_image():
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    texture = cv2.GaussianBlur(texture, (5, 5), 1.0)
    mask = foreground_mask(texture, "auto")
    assert mask.mean() > 0.99


def test_auto_bright_object_on_dark_background():
    image, disc = _disc_scene(210, 25)
    assert _iou(foreground_mask(image, "auto"), disc) > 0.9


def test_auto_dark_object_on_bright_background():
    image, disc = _disc_scene(40, 220)
    assert _iou(foreground_mask(image, "auto"), disc) > 0.9


def test_otsu_polarities_complement():
    image, _ = _disc_scene(180, 60)
    bright = foreground_mask(image, "otsu_bright")
    dark = foreground_mask(image, "otsu_dark")
    np.testing.assert_array_equal(bright + dark, np.ones_like(bright))


@pytest.mark.parametrize("method", FOREGROUND_METHODS)
def test_every_method_shape_and_dtype(method):
    image, _ = _disc_scene(200, 30)
    mask = foreground_mask(image, method)
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1} and mask.any()


@pytest.mark.parametrize("method", ["border_flood", "grabcut"])
def test_flood_and_grabcut_find_centred_object(method):
    image, disc = _disc_scene(200, 30)
    assert _iou(foreground_mask(image, method), disc) > 0.85


def test_tiny_foreground_falls_back_to_ones(caplog):
    image = np.full((SIZE, SIZE, 3), 20, np.uint8)
    image[10, 10] = 250  # a single bright pixel: below min_fraction
    with caplog.at_level(logging.WARNING):
        mask = foreground_mask(image, "otsu_bright", min_fraction=0.01)
    assert mask.all()
    assert "min_fraction" in caplog.text


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown foreground method"):
        foreground_mask(np.zeros((8, 8, 3), np.uint8), "magic")
