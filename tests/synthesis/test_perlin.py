import numpy as np
import pytest

from fsad_pipeline.synthesis.perlin import perlin_mask, perlin_noise


def test_noise_range_and_mean():
    values = np.concatenate(
        [perlin_noise((64, 64), (4, 8), np.random.default_rng(seed)).ravel() for seed in range(40)]
    )
    assert values.dtype == np.float32
    assert -1.5 <= values.min() and values.max() <= 1.5
    assert abs(values.mean()) < 0.05
    assert values.std() > 0.1


@pytest.mark.parametrize("shape,res", [((50, 70), (3, 8)), ((33, 17), (4, 2)), ((64, 64), (1, 1)), ((10, 12), (16, 16))])
def test_shapes_not_divisible_by_res(shape, res):
    noise = perlin_noise(shape, res, np.random.default_rng(0))
    assert noise.shape == shape and np.isfinite(noise).all()


def test_noise_deterministic_and_seed_dependent():
    a = perlin_noise((32, 32), (4, 4), np.random.default_rng(7))
    b = perlin_noise((32, 32), (4, 4), np.random.default_rng(7))
    c = perlin_noise((32, 32), (4, 4), np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mask_binary_deterministic_and_seed_dependent():
    masks = [perlin_mask((64, 48), np.random.default_rng(s)) for s in (3, 3, 4)]
    assert masks[0].dtype == np.uint8 and masks[0].shape == (64, 48)
    assert set(np.unique(masks[0])) <= {0, 1}
    np.testing.assert_array_equal(masks[0], masks[1])
    many_a = np.stack([perlin_mask((64, 64), np.random.default_rng(s)) for s in range(10)])
    many_b = np.stack([perlin_mask((64, 64), np.random.default_rng(s + 100)) for s in range(10)])
    assert not np.array_equal(many_a, many_b)


def test_threshold_controls_area():
    rng_low, rng_high = np.random.default_rng(0), np.random.default_rng(0)
    low = np.mean([perlin_mask((64, 64), rng_low, threshold=0.0).mean() for _ in range(10)])
    high = np.mean([perlin_mask((64, 64), rng_high, threshold=0.5).mean() for _ in range(10)])
    assert low > high
    assert 0.3 < low < 0.7
    assert not perlin_mask((64, 64), np.random.default_rng(0), threshold=2.0).any()


def test_area_range_respected():
    rng = np.random.default_rng(1)
    for _ in range(10):
        mask = perlin_mask((64, 64), rng, threshold=0.35, rotation_range=None, area_range=(0.1, 0.4))
        assert 0.1 < mask.mean() < 0.4


def test_area_range_impossible_returns_last_draw():
    mask = perlin_mask((32, 32), np.random.default_rng(0), area_range=(0.99, 1.0), max_tries=3)
    assert mask.shape == (32, 32) and mask.dtype == np.uint8
