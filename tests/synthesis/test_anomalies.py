import cv2
import numpy as np
import pytest

from fsad_pipeline.synthesis.anomalies import (
    PseudoAnomalySet,
    blend_anomaly,
    build_pseudo_anomaly_set,
    make_pseudo_anomaly,
    paste_texture_anomaly,
    rotate_image,
)
from fsad_pipeline.synthesis.foreground import foreground_mask
from fsad_pipeline.synthesis.textures import TextureBank


@pytest.fixture(scope="module")
def bank() -> TextureBank:
    return TextureBank.from_sources(use_skimage=False, gimp_dirs=())


def _object_image(size: int = 48) -> np.ndarray:
    image = np.full((size, size, 3), 20, np.uint8)
    cv2.circle(image, (size // 2, size // 2), size // 3, (210, 190, 120), -1)
    return image


def test_blend_formula():
    image = np.full((4, 4, 3), 200, np.uint8)
    texture = np.full((4, 4, 3), 50, np.uint8)
    mask = np.zeros((4, 4), np.uint8)
    mask[1:3, 1:3] = 1
    inside = mask.astype(bool)
    out0 = blend_anomaly(image, texture, mask, 0.0)
    assert out0.dtype == np.float32 and out0.shape == (4, 4, 3)
    np.testing.assert_allclose(out0[inside], 50 / 255, atol=1e-6)
    np.testing.assert_allclose(out0[~inside], 200 / 255, atol=1e-6)
    np.testing.assert_allclose(blend_anomaly(image, texture, mask, 1.0), 200 / 255, atol=1e-6)
    half = blend_anomaly(image, texture, mask, 0.5)
    np.testing.assert_allclose(half[inside], 125 / 255, atol=1e-6)


def test_rotate_image_has_no_black_corners():
    uniform = np.full((40, 60, 3), 180, np.uint8)
    rotated = rotate_image(uniform, 37.0)
    assert rotated.shape == uniform.shape and rotated.dtype == np.uint8
    assert (rotated == 180).all()
    matrix = cv2.getRotationMatrix2D((29.5, 19.5), 37.0, 1.0)
    black = cv2.warpAffine(uniform, matrix, (60, 40), borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    assert (black == 0).any()  # what the reference's constant-0 fill would give


def test_anomaly_always(bank):
    image = _object_image()
    for seed in range(8):
        sample = make_pseudo_anomaly(image, np.random.default_rng(seed), bank, anomaly_probability=1.0)
        assert sample.normal.shape == image.shape and sample.image.dtype == np.uint8
        assert sample.mask.shape == image.shape[:2] and sample.mask.dtype == np.uint8
        assert sample.label == int(sample.mask.any())
        foreground = foreground_mask(sample.normal, "auto")
        assert not (sample.mask & (1 - foreground)).any()  # mask ⊆ rotated foreground
        outside = sample.mask == 0
        np.testing.assert_array_equal(sample.image[outside], sample.normal[outside])
    labels = [
        make_pseudo_anomaly(image, np.random.default_rng(s), bank, anomaly_probability=1.0, perlin_kwargs={"threshold": 0.0}).label
        for s in range(5)
    ]
    assert all(label == 1 for label in labels)


def test_anomaly_never(bank):
    sample = make_pseudo_anomaly(_object_image(), np.random.default_rng(0), bank, anomaly_probability=0.0)
    assert sample.label == 0 and not sample.mask.any()
    np.testing.assert_array_equal(sample.image, sample.normal)


def test_precomputed_foreground_is_rotated(bank):
    image = _object_image()
    left_half = np.zeros(image.shape[:2], np.uint8)
    left_half[:, :24] = 1
    sample = make_pseudo_anomaly(
        image, np.random.default_rng(3), bank, foreground=left_half, anomaly_probability=1.0,
        rotation_range=(90.0, 90.0), perlin_kwargs={"threshold": -2.0},
    )
    # +90° (counter-clockwise) maps the left half onto the bottom half
    assert sample.mask[30:].all() and not sample.mask[:18].any()


def test_build_set(bank):
    rng = np.random.default_rng(0)
    supports = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(2)]
    result = build_pseudo_anomaly_set(supports, 100, np.random.default_rng(1), bank, progress=False,
                                      perlin_kwargs={"threshold": 0.2})
    assert isinstance(result, PseudoAnomalySet) and len(result) == 200
    result.validate()
    np.testing.assert_array_equal(result.source_index, np.repeat([0, 1], 100))
    assert result.images.shape == (200, 32, 32, 3) and result.masks.shape == (200, 32, 32)
    assert 0.7 <= result.labels.mean() <= 0.9
    again = build_pseudo_anomaly_set(supports, 100, np.random.default_rng(1), bank, progress=False,
                                     perlin_kwargs={"threshold": 0.2})
    for field in ("normals", "images", "masks", "labels", "source_index"):
        np.testing.assert_array_equal(getattr(result, field), getattr(again, field))


def test_build_set_rejects_mixed_sizes(bank):
    supports = [np.zeros((32, 32, 3), np.uint8), np.zeros((16, 32, 3), np.uint8)]
    with pytest.raises(ValueError, match="share one size"):
        build_pseudo_anomaly_set(supports, 2, np.random.default_rng(0), bank, progress=False)


def test_validate_catches_bad_dtype():
    good = PseudoAnomalySet(
        np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 4, 4), np.uint8),
        np.zeros(2, np.int64), np.zeros(2, np.int64),
    )
    good.validate()
    good.labels = good.labels.astype(np.int32)
    with pytest.raises(ValueError, match="labels"):
        good.validate()


def test_family_defaults_concat_and_validation():
    masks = np.zeros((3, 4, 4), np.uint8)
    masks[1, 1, 1] = 1
    images = np.zeros((3, 4, 4, 3), np.uint8)
    synthetic = PseudoAnomalySet(images, images, masks, np.array([0, 1, 0]), np.zeros(3, np.int64))
    assert synthetic.family.tolist() == ["normal", "perlin", "normal"]  # sets made before families existed
    real = PseudoAnomalySet(images[:1], images[:1], masks[1:2], np.ones(1, np.int64), np.full(1, -1),
                            defect_shot=np.zeros(1, np.int64))
    assert real.family.tolist() == ["real"]
    merged = synthetic.concat(real)
    assert merged.family.tolist() == ["normal", "perlin", "normal", "real"]
    custom = PseudoAnomalySet(images, images, masks, np.array([0, 1, 0]), np.zeros(3, np.int64),
                              family=np.array(["normal", "scratch", "normal"], dtype=object))
    assert custom.family.dtype.kind == "U" and custom.validate().family[1] == "scratch"
    custom.family = np.array(["normal", "normal", "normal"])
    with pytest.raises(ValueError, match="label-0 rows"):
        custom.validate()


def test_old_sample_set_without_family_column_loads_as_perlin(tmp_path):
    import pandas as pd

    from fsad_pipeline.artifacts import load_sample_set, save_sample_set

    masks = np.zeros((2, 8, 8), np.uint8)
    masks[1, 2:4, 2:4] = 1
    images = np.full((2, 8, 8, 3), 100, np.uint8)
    samples = PseudoAnomalySet(images, images, masks, np.array([0, 1]), np.zeros(2, np.int64))
    save_sample_set(tmp_path / "set", samples)
    table = pd.read_csv(tmp_path / "set" / "samples.csv")
    assert table["family"].tolist() == ["normal", "perlin"]
    table.drop(columns=["family"]).to_csv(tmp_path / "set" / "samples.csv", index=False)
    assert load_sample_set(tmp_path / "set").family.tolist() == ["normal", "perlin"]


def test_paste_texture_anomaly_matches_make_pseudo_anomaly(bank):
    image = _object_image()
    foreground = foreground_mask(image, "auto")
    sample = make_pseudo_anomaly(image, np.random.default_rng(4), bank, foreground=foreground,
                                 anomaly_probability=1.0, rotation_range=(0.0, 0.0))
    rng = np.random.default_rng(4)
    rng.uniform(0.0, 0.0), rng.random()  # the rotation and anomaly draws make_pseudo_anomaly makes first
    augmented, mask = paste_texture_anomaly(image, foreground, rng, bank)
    np.testing.assert_array_equal(augmented, sample.image)
    np.testing.assert_array_equal(mask, sample.mask)
