import numpy as np
import pytest

from fsad_pipeline.synthesis.pseudo_classes import blob_mask, build_pseudo_class_set, draw_mask
from fsad_pipeline.synthesis.textures import KIND_PROCEDURAL, PROCEDURAL_GENERATORS, TextureBank, TextureSource


def _plain_bank() -> TextureBank:
    """Three flat-colour 'texture' classes, so a pasted pixel tells which class was used."""
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}

    def flat(colour):
        return lambda rng, size: np.broadcast_to(np.array(colour, np.uint8), (*size, 3)).copy()

    return TextureBank([TextureSource(name, KIND_PROCEDURAL, generator=flat(c)) for name, c in colours.items()])


def _supports(count: int = 3, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(100, 140, size=(count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", ["perlin", "blob"])
def test_draw_mask_area_in_range(kind):
    rng = np.random.default_rng(1)
    fractions = [draw_mask((64, 64), rng, kind=kind).mean() for _ in range(20)]
    assert all(0.10 < f < 0.40 for f in fractions), fractions


def test_draw_mask_inside_foreground():
    foreground = np.zeros((64, 64), np.uint8)
    foreground[:, :32] = 1
    mask = draw_mask((64, 64), np.random.default_rng(2), kind="blob", foreground=foreground)
    assert not mask[:, 32:].any()
    assert 0.10 < mask.sum() / foreground.sum() < 0.40


def test_blob_mask_binary():
    mask = blob_mask((40, 50), np.random.default_rng(3))
    assert mask.shape == (40, 50) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}


def test_pseudo_classes_labels_sources_and_raw_texture():
    supports = _supports()
    bank = _plain_bank()
    result = build_pseudo_class_set(supports, bank, np.random.default_rng(4), samples_per_class=4, beta_range=(0.0, 1e-9), progress=False)
    assert len(result) == 12
    assert result.class_names == ["red", "green", "blue"]
    np.testing.assert_array_equal(np.bincount(result.labels), [4, 4, 4])
    np.testing.assert_array_equal(result.source_index[:4], [0, 1, 2, 0])  # round-robin over the normals
    areas = result.masks.reshape(len(result), -1).mean(axis=1)
    assert np.all((areas > 0.10) & (areas < 0.40))
    for row in range(len(result)):
        inside = result.masks[row].astype(bool)
        colour = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255)][result.labels[row]])
        # beta ~ 0: the raw texture colour of the sample's class is pasted, un-augmented
        np.testing.assert_array_equal(result.images[row][inside], np.broadcast_to(colour, (inside.sum(), 3)))
        # outside the mask the image is its own source normal
        np.testing.assert_array_equal(result.images[row][~inside], supports[result.source_index[row]][~inside])


def test_pseudo_classes_deterministic_and_blend_range():
    supports = _supports(2)
    bank = TextureBank([TextureSource(f"procedural:{n}", KIND_PROCEDURAL, generator=g) for n, g in PROCEDURAL_GENERATORS.items()])
    first = build_pseudo_class_set(supports, bank, np.random.default_rng(5), samples_per_class=2, progress=False)
    second = build_pseudo_class_set(supports, bank, np.random.default_rng(5), samples_per_class=2, progress=False)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.masks, second.masks)
    assert len(first.class_names) == len(PROCEDURAL_GENERATORS)


def test_pseudo_classes_rejects_bad_input():
    with pytest.raises(ValueError):
        build_pseudo_class_set([], _plain_bank(), np.random.default_rng(0), progress=False)
    with pytest.raises(ValueError):
        build_pseudo_class_set(_supports(), _plain_bank(), np.random.default_rng(0), mask_kinds=("square",), progress=False)


def test_pseudo_classes_stay_in_the_foreground_and_ignore_an_empty_one():
    supports = _supports(2, 32)
    foreground = np.zeros((2, 32, 32), np.uint8)
    foreground[0, :, :16] = 1  # the second support has an empty mask: pasted anywhere
    result = build_pseudo_class_set(supports, _plain_bank(), np.random.default_rng(6), samples_per_class=2, foreground_masks=foreground, progress=False)
    on_first = result.source_index == 0
    assert not result.masks[on_first][:, :, 16:].any()
    assert result.masks[~on_first].any()
