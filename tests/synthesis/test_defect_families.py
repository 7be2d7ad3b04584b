import time

import cv2
import numpy as np
import pytest

from fsad_pipeline.artifacts import load_sample_set, save_sample_set
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet, build_pseudo_anomaly_set
from fsad_pipeline.synthesis.defect_families import (
    FAMILY_NAMES,
    BlotchParams,
    CutPasteParams,
    FamilyConfig,
    FamilyFailure,
    ScratchParams,
    SpeckleParams,
    family_example_rows,
    make_family_anomaly,
)
from fsad_pipeline.synthesis.textures import TextureBank

EXACT = ("scratch", "speckle", "cutpaste", "blotch", "missing")  # mask == changed pixels


@pytest.fixture(scope="module")
def bank() -> TextureBank:
    return TextureBank.from_sources(use_skimage=False, gimp_dirs=())


def _texture(shape=(96, 80), seed=0) -> np.ndarray:
    """A mid-grey noisy colour surface (room to go darker and brighter)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(90, 170, size=(*shape, 3)).astype(np.uint8)
    return cv2.GaussianBlur(base, (3, 3), 0)


def _object(shape=(96, 128)) -> tuple[np.ndarray, np.ndarray]:
    """A textured ellipse on a flat dark background, with its foreground mask."""
    image = np.full((*shape, 3), 15, np.uint8)
    foreground = np.zeros(shape, np.uint8)
    centre, axes = (shape[1] // 2, shape[0] // 2), (shape[1] // 3, shape[0] // 3)
    cv2.ellipse(foreground, centre, axes, 0, 0, 360, 1, -1)
    surface = _texture(shape, seed=3)
    image[foreground > 0] = surface[foreground > 0]
    return image, foreground


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("shape", [(64, 64), (72, 120), (130, 50)])
def test_exact_families_mark_exactly_the_changed_pixels_inside_the_foreground(name, shape):
    image, foreground = _object(shape)
    for seed in range(6):
        out, mask = make_family_anomaly(name, image, foreground, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert mask.any()
        changed = (out != image).any(axis=-1)
        np.testing.assert_array_equal(changed, mask.astype(bool))
        assert not (mask & (1 - foreground)).any()


def test_perlin_family_reuses_the_dfd_paste_inside_the_foreground(bank):
    image, foreground = _object((64, 96))
    params = {"perlin": {"threshold": 0.2}}
    out, mask = make_family_anomaly("perlin", image, foreground, np.random.default_rng(0), params, textures=bank)
    assert mask.any() and not (mask & (1 - foreground)).any()
    np.testing.assert_array_equal(out[mask == 0], image[mask == 0])
    with pytest.raises(ValueError, match="TextureBank"):
        make_family_anomaly("perlin", image, foreground, np.random.default_rng(0))


@pytest.mark.parametrize("max_width", [1, 2, 3])
def test_scratch_thickness_stays_within_the_configured_width(max_width):
    image = _texture((256, 200))
    params = ScratchParams(width_fraction=(1 / 200, max_width / 200))  # fractions of the shorter side
    widths = set()
    for seed in range(30):
        _, mask = make_family_anomaly("scratch", image, None, np.random.default_rng(seed), params)
        distance = cv2.distanceTransform(np.pad(mask, 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        widths.add(round(2 * float(distance.max()) - 1, 3))  # 1 px line -> 1, 3 px band -> 3
    assert max(widths) <= max_width + 1e-6
    if max_width == 3:
        assert max(widths) > 2  # the wide end of the range is really drawn


def test_scratch_length_follows_the_image_size():
    image = _texture((400, 300))
    params = ScratchParams(width_fraction=(1 / 300, 1 / 300), length_fraction=(0.3, 0.3), turn_deg=0.0)
    _, mask = make_family_anomaly("scratch", image, None, np.random.default_rng(1), params)
    ys, xs = np.nonzero(mask)
    extent = np.hypot(np.ptp(ys), np.ptp(xs))
    assert 0.8 * 90 <= extent <= 90 + 2  # 0.3 × the shorter side, straight (clipped at most at a border)


def test_speckle_dots_have_the_configured_diameters_and_count():
    image = _texture((256, 256))
    params = SpeckleParams(count=(2, 5), diameter_fraction=(3 / 256, 8 / 256), aspect=(1.0, 1.0))
    sizes = []
    for seed in range(25):
        _, mask = make_family_anomaly("speckle", image, None, np.random.default_rng(seed), params)
        n_components, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        assert 2 <= n_components - 1 <= 5
        sizes += [max(int(w), int(h)) for w, h in stats[1:, 2:4]]
    assert min(sizes) >= 3 - 1 and max(sizes) <= 8 + 1  # ±1 px of pixel-grid rounding
    assert max(sizes) >= 7  # the whole range is used


def test_cutpaste_patch_is_a_copy_of_the_image_and_of_the_right_size():
    image = _texture((128, 160))
    params = CutPasteParams(size_fraction=(0.1, 0.1), aspect=(1.0, 1.0), rotation_deg=(0.0, 0.0))
    out, mask = make_family_anomaly("cutpaste", image, None, np.random.default_rng(4), params)
    ys, xs = np.nonzero(mask)
    assert np.ptp(ys) <= 14 and np.ptp(xs) <= 14  # a 12.8 px square (holes where the copy equals the image)
    pasted = {tuple(p) for p in out[mask > 0].reshape(-1, 3)}
    source = {tuple(p) for p in image.reshape(-1, 3)}
    assert pasted <= source


def test_blotch_amplitude_and_grey_images_stay_grey():
    grey = np.repeat(_texture((96, 96))[..., :1], 3, axis=2)
    params = BlotchParams(amplitude=(0.2, 0.2), change_threshold=0.02)
    for seed in range(5):
        out, mask = make_family_anomaly("blotch", grey, None, np.random.default_rng(seed), params)
        assert (out == out[..., :1]).all()  # no tint on a grey part
        delta = np.abs(out.astype(int) - grey.astype(int)).max(axis=-1)
        assert delta.max() <= round(0.2 * 255) + 1
        assert (delta[mask > 0] > 0.02 * 255).all()  # faint rims are neither changed nor labelled


def test_missing_fills_with_the_background_colour():
    image, foreground = _object((96, 128))
    out, mask = make_family_anomaly("missing", image, foreground, np.random.default_rng(2))
    assert (out[mask > 0] == 15).all()


def test_families_are_deterministic_for_a_seed(bank):
    image, foreground = _object((80, 100))
    for name in FAMILY_NAMES:
        kwargs = {"textures": bank} if name == "perlin" else {}
        first = make_family_anomaly(name, image, foreground, np.random.default_rng(9), **kwargs)
        second = make_family_anomaly(name, image, foreground, np.random.default_rng(9), **kwargs)
        other = make_family_anomaly(name, image, foreground, np.random.default_rng(10), **kwargs)
        np.testing.assert_array_equal(first[0], second[0])
        np.testing.assert_array_equal(first[1], second[1])
        assert not np.array_equal(first[1], other[1])


def test_dispatcher_rejects_unknown_names_and_reports_failure():
    image = _texture((32, 32))
    with pytest.raises(ValueError, match="unknown defect family"):
        make_family_anomaly("dent", image, None, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown ScratchParams keys"):
        make_family_anomaly("scratch", image, None, np.random.default_rng(0), {"widht_fraction": [0.1, 0.2]})
    black = np.zeros((32, 32, 3), np.uint8)  # nothing can get darker
    with pytest.raises(FamilyFailure):
        make_family_anomaly("scratch", black, None, np.random.default_rng(0), {"dark_probability": 1.0}, max_tries=3)


def test_family_config_from_dict_and_missing_needs_a_background():
    config = FamilyConfig.from_dict({
        "families": {"scratch": 1.0, "missing": 2.0, "blotch": 0.0},
        "family_params": {"scratch": {"width_fraction": [0.01, 0.02]}},
    })
    assert config.params["scratch"].width_fraction == (0.01, 0.02)
    assert config.available(np.ones((8, 8))) == {"scratch": 1.0}
    assert config.available(np.eye(8)) == {"scratch": 1.0, "missing": 2.0}
    with pytest.raises(ValueError, match="unknown defect families"):
        FamilyConfig.from_dict({"families": {"dent": 1.0}})
    with pytest.raises(ValueError, match="not all 0"):
        FamilyConfig.from_dict({"families": {"scratch": 0.0}})


def test_draw_falls_back_to_another_family_when_one_fails():
    black = np.zeros((48, 48, 3), np.uint8)
    config = FamilyConfig.from_dict({
        "families": {"scratch": 100.0, "speckle": 1e-9},
        "family_params": {"scratch": {"dark_probability": 1.0}, "speckle": {"dark_probability": 0.0}},
        "max_tries": 2,
    })
    _, mask, name = config.draw(black, None, np.random.default_rng(0))
    assert name == "speckle" and mask.any()


@pytest.mark.parametrize("shape", [(64, 64), (48, 80)])
def test_build_set_with_families(bank, shape, tmp_path):
    supports = [_object(shape)[0], _texture(shape, seed=5)]
    foregrounds = [_object(shape)[1], np.ones(shape, np.uint8)]
    config = FamilyConfig.from_dict({"families": {n: 1.0 for n in FAMILY_NAMES}})

    def build(seed):
        return build_pseudo_anomaly_set(supports, 30, np.random.default_rng(seed), bank, foreground_masks=foregrounds,
                                        families=config, anomaly_probability=0.5, progress=False)

    result = build(0)
    assert isinstance(result, PseudoAnomalySet) and len(result) == 60
    result.validate()
    has_mask = result.masks.reshape(60, -1).max(axis=1) > 0
    np.testing.assert_array_equal(result.labels, has_mask.astype(np.int64))
    np.testing.assert_array_equal(result.family == "normal", result.labels == 0)
    assert set(result.family[result.labels == 1]) <= set(FAMILY_NAMES) and len(set(result.family)) >= 4
    assert "missing" not in set(result.family[result.source_index == 1])  # a texture has no background
    for row in range(60):  # normals are the unrotated support images; normal rows are untouched
        np.testing.assert_array_equal(result.normals[row], supports[int(result.source_index[row])])
        assert not (result.masks[row] & (1 - foregrounds[int(result.source_index[row])])).any()
    np.testing.assert_array_equal(result.images[result.labels == 0], result.normals[result.labels == 0])
    again = build(0)
    for name in ("images", "masks", "labels", "family"):
        np.testing.assert_array_equal(getattr(result, name), getattr(again, name))

    save_sample_set(tmp_path / "set", result)
    loaded = load_sample_set(tmp_path / "set")
    np.testing.assert_array_equal(loaded.family, result.family)
    np.testing.assert_array_equal(loaded.masks, result.masks)

    rows = family_example_rows(result.family, 8)
    assert len(rows) == 8 and result.family[rows[-1]] == "normal"
    anomalous = list(dict.fromkeys(result.family[result.labels == 1].tolist()))
    assert result.family[rows[: len(anomalous)]].tolist() == anomalous[:7]


def test_build_set_with_families_rejects_rotation_keywords(bank):
    config = FamilyConfig.from_dict({"families": {"scratch": 1.0}})
    with pytest.raises(ValueError, match="do not apply with families"):
        build_pseudo_anomaly_set([_texture((32, 32))], 2, np.random.default_rng(0), bank, families=config,
                                 rotation_range=(-90.0, 90.0), progress=False)


def test_validation_split_builds_fast_at_256(bank):
    supports = [_object((256, 256))[0], _texture((256, 256))]
    config = FamilyConfig.from_dict({"families": {n: 1.0 for n in FAMILY_NAMES}})
    start = time.perf_counter()
    build_pseudo_anomaly_set(supports, 20, np.random.default_rng(0), bank, families=config,
                             anomaly_probability=0.5, progress=False)
    assert time.perf_counter() - start < 5.0  # ~0.3-0.5 s measured; generous for a shared CPU


def test_family_examples_figure_names_each_family(bank):
    from fsad_pipeline.pipelines.synthesis.nodes import plot_family_examples

    supports = [_object((48, 64))[0]]
    config = FamilyConfig.from_dict({"families": {"scratch": 1.0, "speckle": 1.0}})
    samples = build_pseudo_anomaly_set(supports, 12, np.random.default_rng(0), bank, families=config,
                                       anomaly_probability=0.5, progress=False)
    figure = plot_family_examples(samples, 3)
    titles = [ax.get_title() for ax in figure.axes]
    assert len(figure.axes) == 3 * 4  # normal | augmented | mask | overlay per row
    assert any("scratch" in t for t in titles) and any("speckle" in t for t in titles)
    assert "augmented (label=0)" in titles


def test_unseen_validation_set_holds_each_good_image_once_then_its_defects(bank):
    from fsad_pipeline.synthesis.anomalies import build_unseen_validation_set

    images = np.stack([_texture((64, 48), seed=s) for s in range(3)])
    config = FamilyConfig.from_dict({"families": {"scratch": 1.0, "speckle": 1.0}})
    result = build_unseen_validation_set(images, 2, np.random.default_rng(0), bank, config, progress=False)
    assert len(result) == 3 + 3 * 2 and result.from_unseen.all()  # no row comes from a support
    np.testing.assert_array_equal(result.labels, [0, 0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(result.images[:3], images)  # the good images as they are, once each
    for row, source in zip(range(3, 9), [0, 0, 1, 1, 2, 2]):  # each defect is drawn on its own good image
        np.testing.assert_array_equal(result.normals[row], images[source])
        changed = (result.images[row] != images[source]).any(axis=-1)
        assert changed.any() and not (changed & (result.masks[row] == 0)).any()
    assert set(result.family[3:]) <= {"scratch", "speckle"}
    with pytest.raises(ValueError, match="n_defects_per_image"):
        build_unseen_validation_set(images, 0, np.random.default_rng(0), bank, config, progress=False)
