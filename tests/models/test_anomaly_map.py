"""Tests of DFD anomaly-map construction, normalisation and fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from fsad_pipeline.models.anomaly_map import (
    DFDAnomalyMapGenerator,
    NormalizationStats,
    gaussian_blur,
    gaussian_kernel1d,
    min_max_normalize,
    patch_scores_to_map,
    upsample_scores,
)


@pytest.mark.parametrize("shape", [(32, 32), (16, 24), (5, 7), (64, 48)])
@pytest.mark.parametrize("sigma", [4.0, 1.5])
def test_gaussian_blur_matches_scipy(shape: tuple[int, int], sigma: float) -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(3, *shape, generator=generator)
    expected = np.stack(
        [
            gaussian_filter(m.astype(np.float64), sigma=sigma, mode="reflect", truncate=4.0)
            for m in maps.numpy()
        ]
    )
    np.testing.assert_allclose(gaussian_blur(maps, sigma).numpy(), expected, atol=1e-4)


def test_gaussian_kernel_size_and_normalisation() -> None:
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 2 * int(4 * 4.0 + 0.5) + 1 == 33
    assert kernel.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(kernel, kernel.flip(0))


def test_patch_scores_to_map_shape_and_constant() -> None:
    scores = torch.full((2, 4, 4), 3.0)
    maps = patch_scores_to_map(scores, (16, 16), sigma=4.0)
    assert maps.shape == (2, 16, 16)
    torch.testing.assert_close(maps, torch.full((2, 16, 16), 3.0))


@pytest.mark.parametrize(("grid", "size", "sigma"), [((32, 32), (256, 256), 4.0), ((5, 7), (37, 64), 1.5), ((4, 6), (16, 24), 0.0)])
def test_patch_scores_to_map_equals_upsample_then_blur(
    grid: tuple[int, int], size: tuple[int, int], sigma: float
) -> None:
    """The two-matrix map is the interpolation followed by the scipy-equal blur, not an approximation."""
    scores = torch.randn(3, *grid, generator=torch.Generator().manual_seed(1))
    reference = gaussian_blur(upsample_scores(scores, size), sigma)
    torch.testing.assert_close(patch_scores_to_map(scores, size, sigma), reference, atol=1e-5, rtol=1e-5)
    assert patch_scores_to_map(scores.double(), size, sigma).dtype == torch.float64


def test_normalization_stats_round_trip_and_percentiles() -> None:
    perlin = torch.arange(101, dtype=torch.float32).reshape(1, 1, 101)
    gaussian = -perlin
    stats = NormalizationStats.from_maps(perlin, gaussian)
    assert stats == NormalizationStats(0.0, 100.0, -100.0, 0.0)
    assert NormalizationStats.from_dict(stats.to_dict()) == stats
    robust = NormalizationStats.from_maps(
        perlin, gaussian, lower_percentile=1.0, upper_percentile=99.0
    )
    assert robust.perlin_min == pytest.approx(1.0) and robust.perlin_max == pytest.approx(99.0)
    assert robust.gaussian_min == pytest.approx(-99.0)
    assert robust.gaussian_max == pytest.approx(-1.0)


def test_min_max_normalize_guards_zero_range() -> None:
    maps = torch.ones(1, 2, 2)
    assert torch.isfinite(min_max_normalize(maps, 1.0, 1.0)).all()


def test_generator_path_map_equals_sum_of_maps() -> None:
    generator = DFDAnomalyMapGenerator((16, 16), sigma=2.0)
    low, high = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    separate = patch_scores_to_map(low, (16, 16), 2.0) + patch_scores_to_map(high, (16, 16), 2.0)
    torch.testing.assert_close(generator.path_map(low, high), separate, atol=1e-5, rtol=1e-5)


def test_generator_fusion_and_outputs() -> None:
    generator = DFDAnomalyMapGenerator((16, 16), sigma=1.0)
    scores = [torch.randn(3, 4, 4) for _ in range(4)]
    stats = NormalizationStats(perlin_min=-2.0, perlin_max=2.0, gaussian_min=-1.0, gaussian_max=3.0)
    outputs = generator(*scores, stats=stats)
    assert set(outputs) >= {"anomaly_map", "pred_score", "perlin_map", "gaussian_map"}
    assert outputs["anomaly_map"].shape == (3, 16, 16)
    assert outputs["pred_score"].shape == (3,)
    perlin_norm = (outputs["perlin_map"] + 2.0) / 4.0
    expected = 0.5 * perlin_norm + 0.5 * (outputs["gaussian_map"] + 1.0) / 4.0
    torch.testing.assert_close(outputs["anomaly_map"], expected)
    torch.testing.assert_close(outputs["pred_score"], expected.flatten(1).amax(1))
    torch.testing.assert_close(outputs["perlin_score"], outputs["perlin_map"].flatten(1).amax(1))
    only_perlin = generator.fuse(
        outputs["perlin_map"], outputs["gaussian_map"], stats, weights=(1.0, 0.0)
    )
    torch.testing.assert_close(only_perlin, perlin_norm)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_non_finite_patch_score_does_not_poison_the_whole_map(bad: float) -> None:
    """Every pixel is a weighted sum over every patch: a NaN or an empty IVF probe's inf would
    turn the whole map NaN. It scores as the image's highest finite patch instead."""
    from fsad_pipeline.models.anomaly_map import patch_scores_to_map

    torch.manual_seed(0)
    scores = torch.rand(2, 8, 8)
    poisoned = scores.clone()
    poisoned[0, 3, 4] = bad
    maps = patch_scores_to_map(poisoned, (32, 32), sigma=2.0)
    assert torch.isfinite(maps).all()
    repaired = scores.clone()
    repaired[0, 3, 4] = torch.cat([scores[0].flatten()[: 3 * 8 + 4], scores[0].flatten()[3 * 8 + 5 :]]).max()
    torch.testing.assert_close(maps, patch_scores_to_map(repaired, (32, 32), sigma=2.0))
    allbad = torch.full((1, 8, 8), bad)
    assert torch.equal(patch_scores_to_map(allbad, (16, 16), sigma=1.0), torch.zeros(1, 16, 16))
