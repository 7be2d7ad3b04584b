"""Tests of the per-position Gaussian scorer (tiny dims, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fsad_pipeline.models.gaussian import PositionGaussianScorer


def _scorer(**kwargs: object) -> PositionGaussianScorer:
    return PositionGaussianScorer(progress=False, **kwargs)  # type: ignore[arg-type]


def test_estimates_known_gaussian() -> None:
    generator = torch.Generator().manual_seed(0)
    dim, num = 3, 4000
    true_mean = torch.tensor([1.0, -2.0, 0.5])
    factor = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [-0.3, 0.2, 0.6]])
    true_cov = factor @ factor.T
    samples = torch.randn(num, 2, 2, dim, generator=generator) @ factor.T + true_mean
    features = samples.permute(0, 3, 1, 2).contiguous()  # (N, D, 2, 2)
    scorer = _scorer(epsilon=0.0).fit(features)
    assert scorer.mean is not None and scorer.precision is not None
    assert scorer.mean.shape == (2, 2, dim)
    assert torch.allclose(scorer.mean, true_mean.expand(2, 2, dim), atol=0.08)
    covariance = torch.linalg.inv(scorer.precision.double()).float()
    assert torch.allclose(covariance, true_cov.expand(2, 2, dim, dim), atol=0.1)


def test_mahalanobis_matches_numpy() -> None:
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(10, 4, 2, 3, generator=generator)
    test = torch.randn(2, 4, 2, 3, generator=generator)
    scorer = _scorer(epsilon=0.01).fit(train)
    scores = scorer.patch_scores(test)
    assert scores.shape == (2, 2, 3)
    train_np = train.double().numpy()
    test_np = test.double().numpy()
    for row in range(2):
        for col in range(3):
            x = train_np[:, :, row, col]
            mean = x.mean(axis=0)
            cov = np.cov(x, rowvar=False) + 0.01 * np.eye(4)
            inverse = np.linalg.inv(cov)
            for n in range(2):
                diff = test_np[n, :, row, col] - mean
                expected = np.sqrt(diff @ inverse @ diff)
                assert abs(scores[n, row, col].item() - expected) < 1e-3 * max(1.0, expected)
    assert torch.equal(scorer.image_scores(test), scores.flatten(1).amax(1))


def test_outlier_scores_higher() -> None:
    generator = torch.Generator().manual_seed(2)
    train = torch.randn(50, 6, 3, 3, generator=generator)
    inliers = torch.randn(4, 6, 3, 3, generator=generator)
    outlier = inliers[:1].clone()
    outlier[0, :, 1, 1] += 10.0
    scorer = _scorer().fit(train)
    inlier_scores = scorer.patch_scores(inliers)
    outlier_score = scorer.patch_scores(outlier)[0, 1, 1]
    assert outlier_score > inlier_scores.max()


def test_shrinkage_handles_fewer_samples_than_dims() -> None:
    generator = torch.Generator().manual_seed(3)
    train = torch.randn(2, 16, 2, 2, generator=generator)
    scorer = _scorer(epsilon=0.01).fit(train)
    scores = scorer.patch_scores(torch.randn(3, 16, 2, 2, generator=generator))
    assert torch.isfinite(scores).all()
    single = _scorer().fit(train[:1]).patch_scores(train)
    assert torch.isfinite(single).all()


def test_channel_subset_deterministic() -> None:
    generator = torch.Generator().manual_seed(4)
    train = torch.randn(8, 20, 2, 2, generator=generator)
    first = _scorer(max_dim=5, seed=7).fit(train)
    second = _scorer(max_dim=5, seed=7).fit(train)
    other = _scorer(max_dim=5, seed=8).fit(train)
    assert first.channel_index is not None and second.channel_index is not None
    assert first.channel_index.numel() == 5
    assert torch.equal(first.channel_index, second.channel_index)
    assert not torch.equal(first.channel_index, other.channel_index)
    assert first.mean is not None and first.mean.shape == (2, 2, 5)
    assert torch.equal(first.patch_scores(train), second.patch_scores(train))
    # max_dim >= D keeps every channel
    full = _scorer(max_dim=64).fit(train)
    assert full.channel_index is not None and torch.equal(full.channel_index, torch.arange(20))


def test_save_load_identical(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(5)
    train = torch.randn(6, 12, 3, 2, generator=generator)
    test = torch.randn(2, 12, 3, 2, generator=generator)
    scorer = _scorer(max_dim=8, seed=3).fit(train)
    scorer.save(tmp_path)
    assert (tmp_path / "gaussian.safetensors").is_file()
    assert (tmp_path / "gaussian.json").is_file()
    loaded = PositionGaussianScorer.load(tmp_path, progress=False)
    assert loaded.name == "gaussian"
    assert torch.equal(loaded.patch_scores(test), scorer.patch_scores(test))
    assert torch.equal(loaded.image_scores(test), scorer.image_scores(test))
