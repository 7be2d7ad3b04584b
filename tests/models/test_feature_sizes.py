"""Non-square inputs through the feature extractor, and the stride rule on image sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsad_pipeline.models.backbones import build_backbone
from fsad_pipeline.models.features import PatchFeatureExtractor, extract_features


@pytest.fixture(scope="module")
def extractor() -> PatchFeatureExtractor:
    torch.manual_seed(0)
    return PatchFeatureExtractor(build_backbone("efficientnet_lite0", pretrained=False), pretrain_dim=16, target_dim=16)


def test_lite0_needs_multiples_of_its_deepest_stages_stride(extractor):
    assert extractor.backbone.strides == [8, 16] and extractor.size_multiple == 16
    assert extractor.grid_size((96, 64)) == (12, 8)  # the stride-8 stage's grid, H x W
    with pytest.raises(ValueError, match=r"100x64 .*multiple of 16"):
        extractor.grid_size((100, 64))


def test_non_square_features_are_h_by_w(extractor):
    images = np.random.default_rng(0).integers(0, 255, (2, 96, 64, 3), dtype=np.uint8)
    low, high = extract_features(extractor, images, image_size=[96, 64], batch_size=2, progress=False)
    assert low.shape == high.shape == (2, 16, 12, 8)
