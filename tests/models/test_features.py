"""Tests for the frequency split and patch features (fsad_pipeline.models.features)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsad_pipeline.models.backbones import build_backbone
from fsad_pipeline.models.features import (
    PatchAggregator,
    PatchFeatureExtractor,
    adaptive_avg_pool_matrix,
    extract_features,
    laplacian_split,
    resize_bilinear,
    select_device,
)

SMALL = 64


@pytest.fixture(scope="module")
def extractor() -> PatchFeatureExtractor:
    torch.manual_seed(0)
    return PatchFeatureExtractor(build_backbone("resnet18", pretrained=False), pretrain_dim=96, target_dim=64)


def _reference_aggregate(features, patch_size, pretrain_dim, target_dim):
    """Straightforward PatchCore-order implementation: unfold, resize, pool, stack, pool."""
    batch = features[0].shape[0]
    grid = features[0].shape[-2:]
    per_layer = []
    for feature in features:
        channels, height, width = feature.shape[1:]
        patches = F.unfold(feature, patch_size, padding=patch_size // 2)
        patches = patches.reshape(batch, channels * patch_size**2, height, width)
        if (height, width) != tuple(grid):
            patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
        vectors = patches.permute(0, 2, 3, 1).reshape(-1, 1, channels * patch_size**2)
        per_layer.append(F.adaptive_avg_pool1d(vectors, pretrain_dim).squeeze(1))
    stacked = torch.stack(per_layer, dim=1).reshape(-1, 1, len(features) * pretrain_dim)
    pooled = F.adaptive_avg_pool1d(stacked, target_dim).squeeze(1)
    return pooled.reshape(batch, *grid, target_dim).permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", [(64, 64), (63, 65), (37, 50), (5, 3)])
def test_laplacian_split_matches_opencv(size):
    height, width = size
    rng = np.random.default_rng(height * 100 + width)
    image = rng.random((height, width, 3), dtype=np.float32)
    expected_low = cv2.pyrUp(cv2.pyrDown(image), dstsize=(width, height))
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    low, high = laplacian_split(x)
    assert low.shape == x.shape == high.shape
    assert np.abs(low[0].permute(1, 2, 0).numpy() - expected_low).max() < 1e-5
    expected_high = cv2.subtract(image, expected_low)
    assert np.abs(high[0].permute(1, 2, 0).numpy() - expected_high).max() < 1e-5


def test_laplacian_split_reconstructs_exactly_batched():
    x = torch.rand(3, 2, 32, 31)
    low, high = laplacian_split(x)
    assert torch.allclose(low + high, x, atol=1e-6)
    # Per-image independence: batching gives the same result.
    low_single, _ = laplacian_split(x[1:2])
    assert torch.allclose(low[1:2], low_single)
    # A constant image is pure low frequency.
    low_const, high_const = laplacian_split(torch.full((1, 1, 16, 16), 0.7))
    assert torch.allclose(low_const, torch.full_like(low_const, 0.7), atol=1e-6)
    assert high_const.abs().max() < 1e-6


@pytest.mark.parametrize(("in_dim", "out_dim"), [(4608, 1536), (360, 1536), (3072, 1536), (10, 7), (7, 10)])
def test_pool_matrix_equals_adaptive_avg_pool1d(in_dim, out_dim):
    x = torch.randn(5, in_dim)
    expected = F.adaptive_avg_pool1d(x[:, None], out_dim)[:, 0]
    assert torch.allclose(x @ adaptive_avg_pool_matrix(in_dim, out_dim), expected, atol=1e-5)


@pytest.mark.parametrize(("size", "out"), [((16, 16), (32, 32)), ((7, 9), (13, 20)), ((8, 8), (5, 3))])
def test_resize_bilinear_equals_interpolate(size, out):
    x = torch.randn(2, 5, *size)
    expected = F.interpolate(x, size=out, mode="bilinear", align_corners=False)
    assert torch.allclose(resize_bilinear(x, out), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("channels", "pretrain_dim", "target_dim"),
    [([40, 112], 1536, 1536), ([16, 24, 8], 50, 64), ([32, 48], 100, 70)],
)
def test_aggregator_matches_reference(channels, pretrain_dim, target_dim):
    torch.manual_seed(0)
    features = [torch.randn(2, c, 16 // 2**i, 12 // 2**i) for i, c in enumerate(channels)]
    aggregator = PatchAggregator(channels, pretrain_dim=pretrain_dim, target_dim=target_dim)
    out = aggregator(features)
    assert out.shape == (2, target_dim, 16, 12)
    assert torch.isfinite(out).all()
    expected = _reference_aggregate(features, 3, pretrain_dim, target_dim)
    assert torch.allclose(out, expected, atol=1e-5)
    assert len(list(aggregator.parameters())) == 0


def test_extractor_shapes_and_dual_path_equals_separate(extractor):
    images = torch.rand(2, 3, SMALL, SMALL)
    assert extractor.grid_size(SMALL) == (8, 8)
    assert extractor.feature_dim == 64
    with torch.inference_mode():
        plain = extractor(images)
        low_features, high_features = extractor.dual_path(images)
        low, high = laplacian_split(images)
        expected_low = extractor(low)
        expected_high = extractor(high)
    assert plain.shape == (2, 64, 8, 8)
    assert torch.isfinite(plain).all()
    assert torch.allclose(low_features, expected_low, atol=1e-5)
    assert torch.allclose(high_features, expected_high, atol=1e-5)
    extractor.train()
    assert not extractor.training


def test_extract_features_shapes_and_determinism(extractor):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 80, 72, 3), dtype=np.uint8)
    low, high = extract_features(extractor, images, image_size=SMALL, batch_size=2, progress=False)
    assert low.shape == high.shape == (5, 64, 8, 8)
    assert low.device.type == "cpu" and low.dtype == torch.float32
    low_again, high_again = extract_features(extractor, images, image_size=SMALL, batch_size=3, progress=False)
    assert torch.allclose(low, low_again, atol=1e-5)
    assert torch.allclose(high, high_again, atol=1e-5)

    single = extract_features(extractor, images[:2], image_size=SMALL, dual_path=False, progress=False)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 64, 8, 8)
    resized = F.interpolate(
        torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float() / 255,
        size=(SMALL, SMALL),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    with torch.inference_mode():
        assert torch.allclose(single, extractor(resized), atol=1e-5)

    half = extract_features(
        extractor, images[:2], image_size=SMALL, dual_path=False, progress=False, dtype=torch.float16
    )
    assert half.dtype == torch.float16


def test_extract_features_empty_input(extractor):
    images = np.zeros((0, 32, 32, 3), dtype=np.uint8)
    low, high = extract_features(extractor, images, image_size=SMALL, progress=False)
    assert low.shape == high.shape == (0, 64, 8, 8)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected


def test_a_bfloat16_feature_pass_returns_float32_features_close_to_the_float32_ones(monkeypatch):
    """``precision: bf16`` runs backbone and aggregator under bfloat16 autocast (auto does so only
    where the chip is native: forced here), and hands back float32 features within bfloat16's
    rounding of the float32 pass; a float32 extractor's output is unchanged."""
    from fsad_pipeline.models import precision as precision_module

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", pretrained=False)
    exact = PatchFeatureExtractor(backbone, pretrain_dim=96, target_dim=64)
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: True)
    fast = PatchFeatureExtractor(backbone, pretrain_dim=96, target_dim=64, precision="auto")
    images = torch.rand(2, 3, SMALL, SMALL)
    with torch.inference_mode():
        reference, features = exact(images), fast(images)
    assert features.dtype == torch.float32 and features.shape == reference.shape
    assert not torch.equal(features, reference)  # it did run in bfloat16
    relative = (features - reference).abs().mean() / reference.abs().mean()
    assert relative < 0.05
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: False)
    with torch.inference_mode():
        assert torch.equal(fast(images), reference)  # auto without native bfloat16: float32


def test_a_float32_extractor_stays_float32_inside_a_callers_bfloat16_autocast():
    torch.manual_seed(0)
    extractor = PatchFeatureExtractor(build_backbone("resnet18", pretrained=False), pretrain_dim=96, target_dim=64)
    images = torch.rand(2, 3, SMALL, SMALL)
    with torch.inference_mode():
        reference = extractor(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = extractor(images)
    assert inside.dtype == torch.float32 and torch.equal(inside, reference)


def test_an_unknown_feature_precision_fails_when_the_extractor_is_built():
    with pytest.raises(ValueError, match="precision"):
        PatchFeatureExtractor(build_backbone("resnet18", pretrained=False), pretrain_dim=96, target_dim=64, precision="fp16")
