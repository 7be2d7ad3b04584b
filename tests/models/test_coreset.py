"""Tests for greedy k-center coreset selection (fsad_pipeline.models.coreset)."""

from __future__ import annotations

import pytest
import torch

from fsad_pipeline.models.coreset import coreset_size, kcenter_greedy, random_projection


def _naive_greedy(points: torch.Tensor, start: int, count: int) -> list[int]:
    """Reference farthest-point selection with a full distance recomputation per step."""
    chosen = [start]
    for _ in range(count - 1):
        distances = torch.cdist(points.double(), points[chosen].double()).min(dim=1).values
        distances[chosen] = -1.0
        chosen.append(int(distances.argmax()))
    return chosen


def test_selects_distinct_indices_and_ratio_count() -> None:
    features = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    indices = kcenter_greedy(features, 0.1, progress=False)
    assert indices.dtype == torch.long and indices.shape == (50,)
    assert indices.unique().numel() == 50
    assert kcenter_greedy(features, 0.001, progress=False).shape == (1,)  # max(1, int(0.5))
    assert kcenter_greedy(features, n_select=7, progress=False).shape == (7,)
    assert kcenter_greedy(features, n_select=10_000, progress=False).unique().numel() == 500


def test_distinct_even_with_duplicate_points() -> None:
    features = torch.zeros(20, 4)
    features[10:] = 1.0  # only two distinct points
    indices = kcenter_greedy(features, n_select=5, projection_dim=None, progress=False)
    assert indices.unique().numel() == 5


def test_one_point_per_well_separated_cluster() -> None:
    generator = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 100.0, 0.0]])
    points = torch.cat([centre + torch.randn(30, 3, generator=generator) for centre in centres])
    labels = torch.arange(3).repeat_interleave(30)
    for seed in range(3):
        indices = kcenter_greedy(points, n_select=3, projection_dim=None, seed=seed, progress=False)
        assert sorted(labels[indices].tolist()) == [0, 1, 2]


def test_matches_naive_farthest_point_selection() -> None:
    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(2))
    indices = kcenter_greedy(features, n_select=20, projection_dim=None, seed=3, progress=True)
    assert indices.tolist() == _naive_greedy(features, int(indices[0]), 20)


def test_deterministic_with_seed_and_projection() -> None:
    features = torch.randn(300, 40, generator=torch.Generator().manual_seed(3))
    first = kcenter_greedy(features, 0.1, projection_dim=8, seed=5, progress=False)
    second = kcenter_greedy(features, 0.1, projection_dim=8, seed=5, progress=False, num_threads=1)
    other = kcenter_greedy(features, 0.1, projection_dim=8, seed=6, progress=False)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    projected = random_projection(features, 8, seed=5)
    assert projected.shape == (300, 8)
    assert random_projection(features, 64) is features  # no projection when not smaller


def test_coreset_size_and_errors() -> None:
    assert coreset_size(100_000, 0.01) == 1000
    assert coreset_size(10, 0.01) == 1
    with pytest.raises(ValueError):
        coreset_size(10)
    with pytest.raises(ValueError):
        kcenter_greedy(torch.randn(4, 2, 2), 0.5, progress=False)
