"""The accelerator paths: every trainable stage on a CUDA device, checked against the CPU.

CI has no GPU, so these tests skip there. They run where ``torch.cuda.is_available()`` (the
project's `device: auto` then picks CUDA), or on any device named by ``FSAD_TEST_DEVICE``
(``FSAD_TEST_DEVICE=cpu`` exercises the test code itself on a CPU-only machine).

What they catch: a tensor left on the wrong device, a CUDA-only dtype or indexing difference,
an artifact saved with CUDA tensors that a CPU-only inference machine then cannot load.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fsad_pipeline.models.dfd_training import DFDTrainConfig
from fsad_pipeline.scoring.dfd_scorer import DFDScorer, FeatureConfig

DEVICE = os.environ.get("FSAD_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (set FSAD_TEST_DEVICE to run on another)")

SIZE = 64


def _normals_then_defects(datasets, rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` test images: the normal half first, then the half with a painted spot."""
    samples = datasets.pseudo_anomaly_set(rng, count, SIZE)
    return samples.images[np.argsort(samples.labels, kind="stable")]


def _on_device(module: torch.nn.Module) -> set[str]:
    return {str(p.device.type) for p in module.parameters()}


def _reset_peak_memory() -> None:
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _used_the_device() -> bool:
    """Whether the work since :func:`_reset_peak_memory` allocated device memory (always true off CUDA)."""
    return torch.device(DEVICE).type != "cuda" or torch.cuda.max_memory_allocated() > 0


def test_dfd_trains_on_the_device_and_its_artifact_scores_alike_on_cpu(tmp_path, datasets):
    rng = np.random.default_rng(0)
    train, validation = datasets.pseudo_anomaly_set(rng, 8, SIZE), datasets.pseudo_anomaly_set(rng, 8, SIZE)
    features = FeatureConfig(pretrain_dim=16, target_dim=16, image_size=SIZE, batch_size=8)
    _reset_peak_memory()
    scorer = DFDScorer.fit(
        train, validation, features=features, device=DEVICE, progress=False,
        train_config=DFDTrainConfig(meta_epochs=1, epochs=2, gaussian_hidden=16, seed=0),
    )
    # The scorer keeps its model on the CPU between calls and moves it to its device to score.
    assert _used_the_device() and torch.device(scorer.device).type == torch.device(DEVICE).type
    test_images = _normals_then_defects(datasets, rng, 6)
    on_device = scorer.score(test_images)
    assert np.isfinite(on_device["pred_score"]).all() and on_device["anomaly_map"].shape == (6, SIZE, SIZE)

    scorer.save(tmp_path / "dfd")  # an inference machine without a GPU must load what a GPU trained
    on_cpu = DFDScorer.load(tmp_path / "dfd", device="cpu").score(test_images)
    np.testing.assert_allclose(on_cpu["pred_score"], on_device["pred_score"], rtol=1e-2, atol=1e-2)  # TF32 convolutions on the GPU
    np.testing.assert_allclose(on_cpu["anomaly_map"], on_device["anomaly_map"], rtol=1e-2, atol=1e-2)  # TF32 convolutions on the GPU


def test_memory_bank_and_gaussian_on_the_device_match_cpu(datasets):
    from fsad_pipeline.models.features import extract_features
    from fsad_pipeline.scoring.patch_scorers import fit_patch_scorers, score_patch_features

    rng = np.random.default_rng(1)
    support = datasets.normals(rng, 4, SIZE)
    queries = _normals_then_defects(datasets, rng, 4)
    features = FeatureConfig(image_size=SIZE, batch_size=4)
    outputs = {}
    for device in ("cpu", DEVICE):
        # Every support patch kept (ratio 1.0): the bank is then the same on both devices.
        scorers, _ = fit_patch_scorers(
            support, features, knn={"coreset_ratio": 1.0, "num_neighbors": 3, "backend": "torch", "device": device},
            gaussian={"enabled": True}, anomalous_bank={"top_fraction": 0.1}, n_supports=4, device=device, progress=False,
        )
        query_features = extract_features(
            features.build_extractor(), queries, image_size=SIZE, batch_size=4, device=device, dual_path=False, progress=False
        )
        outputs[device] = score_patch_features(scorers.scorers, query_features.to(device), SIZE, 4.0)
    for name in ("knn", "gaussian"):
        np.testing.assert_allclose(outputs[DEVICE][name]["pred_score"], outputs["cpu"][name]["pred_score"], rtol=1e-2, atol=1e-2)
        assert outputs[DEVICE][name]["pred_score"][2:].min() > outputs[DEVICE][name]["pred_score"][:2].max(), name


def test_base_training_runs_on_the_device_and_registers_a_cpu_loadable_encoder(tmp_path, datasets):
    from fsad_pipeline.models.base_training import BaseTrainingConfig, train_registration_encoder
    from fsad_pipeline.models.registration import EncoderConfig, load_registered_encoder
    from fsad_pipeline.synthesis.textures import TextureBank

    rng = np.random.default_rng(2)
    categories = {name: {"train": datasets.normals(rng, 5, 32), "validation": datasets.normals(rng, 2, 32)} for name in ("alpha", "beta")}
    config = BaseTrainingConfig.from_dict({
        "image_size": 32, "epochs": 1, "batch_size": 4, "views_per_image": 2, "lr": 1e-3, "progress": False, "device": DEVICE,
        "validation": {"support_images": 2, "anomalies_per_image": 1, "foreground": "none", "feature_dim": 16, "include_initial": False},
    })
    textures = TextureBank.from_sources(None, use_skimage=False, gimp_dirs=(), procedural=True)
    trained, history = train_registration_encoder(categories, EncoderConfig(), config, textures, name="gpu_check")
    assert len(history) == 2 and np.isfinite(history[1]["loss"])
    assert all(torch.isfinite(v).all() for v in trained.encoder.state_dict().values() if v.is_floating_point())

    trained.save(tmp_path / "gpu_check")
    backbone = load_registered_encoder(f"registered:{tmp_path / 'gpu_check'}")
    assert _on_device(backbone) == {"cpu"}
    with torch.inference_mode():
        stages = backbone(torch.rand(1, 3, 32, 32))
    assert all(torch.isfinite(stage).all() for stage in stages)


def test_defect_classifier_trains_on_the_device_and_predicts_alike_on_cpu(tmp_path):
    from fsad_pipeline.models.defect_classifier import (
        PretrainConfig,
        PrototypeClassifier,
        ResidualEncoder,
        fine_tune,
        pretrain,
    )

    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 16, 1, 1, generator=generator) * 2
    labels = np.repeat(np.arange(4), 12)
    residuals = centres[labels] + 0.3 * torch.randn(len(labels), 16, 6, 6, generator=generator)
    torch.manual_seed(0)
    encoder = ResidualEncoder(16, hidden_channels=(32,), embed_dim=16, pooling="mean")
    result = pretrain(
        encoder, residuals, labels, PretrainConfig(n_way=4, n_query=8, max_episodes=40, stop_accuracy=1.1), device=DEVICE, progress=False
    )
    assert result.steps == 40 and _on_device(encoder) == {torch.device(DEVICE).type}
    shots = np.array([0, 1, 12, 13, 24, 25, 36, 37])
    tuned = fine_tune(encoder, residuals[shots], labels[shots], epochs=2, device=DEVICE, progress=False)
    assert not tuned.skipped
    names = [f"type{c}" for c in labels]
    classifier = PrototypeClassifier(encoder, device=DEVICE).fit(residuals[shots], [names[i] for i in shots])
    prediction = classifier.predict(residuals)
    assert np.mean(np.array(prediction.closed_set_type) == np.array(names)) >= 0.9

    classifier.save(tmp_path / "classifier")
    reloaded = PrototypeClassifier.load(tmp_path / "classifier", device="cpu").predict(residuals)
    assert reloaded.closed_set_type == prediction.closed_set_type
    # cuDNN runs float32 convolutions in TF32 on Ampere and later GPUs: ~1e-4 off the CPU.
    np.testing.assert_allclose(reloaded.cosine, prediction.cosine, atol=1e-3)
