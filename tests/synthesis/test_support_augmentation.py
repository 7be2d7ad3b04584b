"""Tests for the deterministic support-set augmentation (methods.md §7)."""

from __future__ import annotations

import numpy as np
import pytest

from fsad_pipeline.synthesis.support_augmentation import (
    augment_labelled_defects,
    SupportAugmentationConfig,
    adjust_brightness,
    adjust_contrast,
    augment_support,
    augmentation_names,
    horizontal_flip,
    rotate,
    rotate90,
    to_grayscale,
    translate,
    views_of_good_images,
    with_labelled_defects,
)
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet

ALL_OFF = dict(
    rotations=False,
    rot90=False,
    translations=False,
    hflip=False,
    grayscale=False,
    brightness=(),
    contrast=(),
    include_original=False,
)


def _images(count: int = 2, height: int = 16, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def test_default_gives_26_views_per_image() -> None:
    config = SupportAugmentationConfig()
    names = augmentation_names(config)
    assert len(names) == 26 and len(set(names)) == 26 and names[0] == "original"
    out = augment_support(_images(2), config)
    assert out.shape == (52, 16, 16, 3) and out.dtype == np.uint8


@pytest.mark.parametrize(
    ("switch", "value", "count"),
    [
        ("include_original", True, 1),
        ("rotations", True, 8),
        ("rot90", True, 3),
        ("translations", True, 8),
        ("hflip", True, 1),
        ("grayscale", True, 1),
        ("brightness", (0.8, 1.2), 2),
        ("contrast", (0.5, 0.8, 1.2), 3),
    ],
)
def test_counts_per_switch(switch: str, value: object, count: int) -> None:
    config = SupportAugmentationConfig(**{**ALL_OFF, switch: value})
    assert len(augmentation_names(config)) == count
    assert augment_support(_images(3), config).shape[0] == 3 * count


def test_regad_set_is_22() -> None:
    config = SupportAugmentationConfig(brightness=(), contrast=())
    assert len(augmentation_names(config)) == 22


def test_only_original_is_identity_and_order_is_image_major() -> None:
    images = _images(3)
    out = augment_support(images, SupportAugmentationConfig(**{**ALL_OFF, "include_original": True}))
    np.testing.assert_array_equal(out, images)
    out_all = augment_support(images, SupportAugmentationConfig())
    np.testing.assert_array_equal(out_all[::26], images)


def test_all_off_raises() -> None:
    with pytest.raises(ValueError):
        augment_support(_images(1), SupportAugmentationConfig(**ALL_OFF))


def test_uniform_image_stays_uniform_under_warps() -> None:
    image = np.full((20, 24, 3), 137, dtype=np.uint8)
    for angle in (11.25, -45.0, 33.75):
        np.testing.assert_array_equal(rotate(image, angle), image)
    np.testing.assert_array_equal(translate(image, 0.2, -0.2), image)
    for times in (1, 2, 3):
        np.testing.assert_array_equal(rotate90(image, times), image)


def test_rotation_has_no_black_corners() -> None:
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    image[10:20, 10:20] = 100
    rotated = rotate(image, 45.0)
    assert rotated.min() >= 100
    corners = rotated[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners >= 100).all()


def test_translation_shifts_content() -> None:
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    image[:, 10] = 255  # a vertical line
    shifted = translate(image, 0.2, 0.0)  # 0.2 in affine_grid units = 2 px of 20
    assert shifted.shape == image.shape
    assert shifted[5, 12].max() == 255 and shifted[5, 10].max() == 0


def test_hflip_twice_is_identity() -> None:
    image = _images(1)[0]
    np.testing.assert_array_equal(horizontal_flip(horizontal_flip(image)), image)
    assert not np.array_equal(horizontal_flip(image), image)


def test_rot90_four_times_is_identity_and_non_square_keeps_size() -> None:
    image = _images(1)[0]
    np.testing.assert_array_equal(rotate90(rotate90(image, 1), 3), image)
    np.testing.assert_array_equal(rotate90(image, 2), image[::-1, ::-1])
    wide = _images(1, 12, 20)[0]
    assert rotate90(wide, 1).shape == wide.shape


def test_non_square_images_get_the_half_turn_only() -> None:
    """A quarter turn of a wide image would be squashed back into H x W: no such view exists."""
    config = SupportAugmentationConfig(**{**ALL_OFF, "include_original": True, "rot90": True})
    assert augmentation_names(config, square=False) == ["original", "rot90x2"]
    wide = _images(2, 12, 20)
    out = augment_support(wide, config)
    assert out.shape == (4, 12, 20, 3)
    np.testing.assert_array_equal(out[1], wide[0][::-1, ::-1])
    np.testing.assert_array_equal(out[3], wide[1][::-1, ::-1])
    assert len(augmentation_names(SupportAugmentationConfig(), square=False)) == 24
    masks = np.zeros((2, 12, 20), np.uint8)
    masks[:, 2, 3] = 1
    views, view_masks, shots = augment_labelled_defects(wide, masks, config)
    assert views.shape == (4, 12, 20, 3) and shots.tolist() == [0, 0, 1, 1]
    assert view_masks[1, 12 - 1 - 2, 20 - 1 - 3] == 1 and view_masks[1].sum() == 1  # the mask turns with it


def test_grayscale_channels_equal_and_weights() -> None:
    image = _images(1)[0]
    gray = to_grayscale(image)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 1], gray[..., 2])
    pixel = np.array([[[255, 0, 0]]], dtype=np.uint8)
    assert to_grayscale(pixel)[0, 0, 0] == round(0.299 * 255)


def test_brightness_and_contrast() -> None:
    image = np.array([[[100, 50, 200]]], dtype=np.uint8)
    np.testing.assert_array_equal(adjust_brightness(image, 1.2), [[[120, 60, 240]]])
    np.testing.assert_array_equal(adjust_brightness(image, 2.0), [[[200, 100, 255]]])
    flat = np.full((4, 4, 3), 90, dtype=np.uint8)
    np.testing.assert_array_equal(adjust_contrast(flat, 0.5), flat)  # mean grey is a fixed point
    varied = _images(1)[0]
    assert adjust_contrast(varied, 0.5).astype(float).std() < varied.astype(float).std()


def test_from_dict() -> None:
    config = SupportAugmentationConfig.from_dict({"rotations": False, "brightness": [], "contrast": [0.9]})
    assert config.brightness == () and config.contrast == (0.9,)
    assert len(augmentation_names(config)) == 26 - 8 - 2 - 1
    assert SupportAugmentationConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        SupportAugmentationConfig.from_dict({"rotation": True})


def test_labelled_defect_masks_follow_geometric_views_only():
    from fsad_pipeline.synthesis.support_augmentation import augment_labelled_defects, augmentation_names

    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 2:6, 20:28] = 255  # a bright defect near the top right
    mask = (image[..., 0] > 0).astype(np.uint8)
    config = SupportAugmentationConfig(rotations=False, translations=False, brightness=(0.5,), contrast=())
    views, masks, shots = augment_labelled_defects(image, mask, config)
    names = augmentation_names(config)
    assert len(views) == len(masks) == len(names) and (shots == 0).all()
    for name, view, view_mask in zip(names, views, masks):
        if name == "grayscale" or name.startswith("brightness"):
            np.testing.assert_array_equal(view_mask, mask[0])
        else:  # the mask moved with the image: it covers exactly the bright pixels
            np.testing.assert_array_equal(view_mask, (view[..., 0] > 127).astype(np.uint8), err_msg=name)
    assert augment_labelled_defects(image, None, config)[1] is None


def test_with_labelled_defects_extends_the_validation_set():
    from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet
    from fsad_pipeline.synthesis.support_augmentation import with_labelled_defects

    rng = np.random.default_rng(0)
    base_images = rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    base_masks = np.zeros((3, 16, 16), np.uint8)
    base_masks[1, 4:8, 4:8] = 1
    base = PseudoAnomalySet(base_images, base_images, base_masks, np.array([0, 1, 0]), np.array([0, 0, 1]))
    defects = rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 2:5, 2:5] = 1  # shot 1 has no ground truth
    config = SupportAugmentationConfig(rotations=False, translations=False, grayscale=False, brightness=(), contrast=())
    merged = with_labelled_defects(base, defects, masks, config)
    per_shot = len(augmentation_names(config))
    assert len(merged) == 3 + 2 * per_shot
    assert (merged.labels[3:] == 1).all() and (merged.source_index[3:] == -1).all()
    np.testing.assert_array_equal(merged.defect_shot, [-1, -1, -1] + [0] * per_shot + [1] * per_shot)
    np.testing.assert_array_equal(merged.mask_known, [True] * (3 + per_shot) + [False] * per_shot)
    assert with_labelled_defects(base, None, None, config) is base


def test_good_images_are_viewed_as_the_labelled_defects_were():
    """The views a defect's rows are named by are the views of the good images it is compared
    with: same transform, same name, image-major, the original left out."""
    config = SupportAugmentationConfig(include_original=True, rot90=True, hflip=True, rotations=False,
                                       translations=False, grayscale=False, brightness=[], contrast=[])
    rng = np.random.default_rng(0)
    defects = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[:, 1, 2] = 1
    good = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    base = PseudoAnomalySet(good[:1], good[:1], np.zeros((1, 8, 8), np.uint8), np.array([0]), np.array([-1]))
    validation = with_labelled_defects(base, defects, masks, config)
    names = augmentation_names(config, square=True)
    assert validation.view.tolist() == ["original"] + names * 2
    views, view_names = views_of_good_images(good, config, ["hflip", "rot90x2", "original"])
    assert view_names.tolist() == ["rot90x2", "hflip"] * 3
    np.testing.assert_array_equal(views[0], np.rot90(good[0], 2))
    np.testing.assert_array_equal(views[5], good[2][:, ::-1])
    empty, none = views_of_good_images(good, config, ["original"])
    assert empty.shape == (0, 8, 8, 3) and none.size == 0
