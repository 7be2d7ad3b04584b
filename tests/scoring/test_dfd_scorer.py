import numpy as np
import torch

from fsad_pipeline.models.features import extract_features
from fsad_pipeline.scoring.dfd_scorer import FeatureConfig, _training_features, distinct_images
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet


def test_distinct_images_finds_byte_identical_rows():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    images = np.stack([a, b, a, a, b])
    first, inverse = distinct_images(images)
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0, 0, 1]
    np.testing.assert_array_equal(images[first][inverse], images)
    changed = images.copy()
    changed[3, 0, 0, 0] ^= 1  # one bit is another image
    assert len(distinct_images(changed)[0]) == 3


def test_training_features_extract_each_clean_image_once(monkeypatch):
    rng = np.random.default_rng(1)
    supports = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    normals = supports[[0, 0, 0, 1, 1, 1]]  # no rotation: every sample of a support shares its clean image
    samples = PseudoAnomalySet(
        images=rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8),
        normals=normals,
        masks=np.zeros((6, 32, 32), np.uint8),
        labels=np.zeros(6, np.int64),
        source_index=np.array([0, 0, 0, 1, 1, 1]),
    )
    features = FeatureConfig(pretrained=False, pretrain_dim=8, target_dim=8, image_size=32, batch_size=4)
    extractor = features.build_extractor()
    counts: list[int] = []
    import fsad_pipeline.scoring.dfd_scorer as module

    def counting(extractor_, images, **kwargs):
        counts.append(len(images))
        return extract_features(extractor_, images, **kwargs)

    monkeypatch.setattr(module, "extract_features", counting)
    cached = _training_features(extractor, samples, features, torch.device("cpu"), False)
    assert counts == [2, 6]  # 2 distinct normals, 6 augmented samples
    direct_low, direct_high = extract_features(extractor, normals, image_size=32, batch_size=4, progress=False)
    torch.testing.assert_close(cached.normal_low, direct_low, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.normal_high, direct_high, rtol=1e-5, atol=1e-5)
    assert cached.normal_low.shape[0] == 6

