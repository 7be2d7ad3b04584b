"""Shared fixtures: tiny generated datasets (in the spirit of anomalib's dummy dataset generator)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")  # Kedro telemetry off
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A woven-looking normal texture: stripes plus mild noise, colour varies a little per image."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = 0.5 + 0.25 * np.sin(xx * 0.8 + rng.uniform(0, 0.3)) * np.sin(yy * 0.8)
    image = np.stack([base * c for c in (1.0, 0.9, 0.8)], axis=2)
    image += rng.normal(0, 0.03, image.shape)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def _defect(image: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    mask = np.zeros((size, size), np.uint8)
    cx, cy = rng.integers(size // 4, 3 * size // 4, size=2)
    if kind == "scratch":
        cv2.line(mask, (int(cx) - size // 5, int(cy)), (int(cx) + size // 5, int(cy) + size // 8), 255, 3)
    else:
        cv2.circle(mask, (int(cx), int(cy)), max(3, size // 10), 255, -1)
    out = image.copy()
    out[mask > 0] = (30, 30, 200) if kind == "scratch" else (240, 240, 20)
    return out, mask


def write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), array), path


def make_mvtec_category(
    root: Path,
    category: str = "widget",
    *,
    n_train: int = 6,
    n_test_good: int = 4,
    defects: dict[str, int] | None = None,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write an MVTec-layout category with masks under ``root/category``; return that folder."""
    rng = np.random.default_rng(seed)
    defects = {"scratch": 3, "spot": 3} if defects is None else defects
    folder = root / category
    for i in range(n_train):
        write_image(folder / "train" / "good" / f"{i:03d}.png", _texture(rng, size))
    for i in range(n_test_good):
        write_image(folder / "test" / "good" / f"{i:03d}.png", _texture(rng, size))
    for kind, count in defects.items():
        for i in range(count):
            image, mask = _defect(_texture(rng, size), rng, kind)
            write_image(folder / "test" / kind / f"{i:03d}.png", image)
            write_image(folder / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return folder


def make_normals(rng: np.random.Generator, count: int, size: int = 64) -> np.ndarray:
    """``count`` normal textures (count, size, size, 3) uint8."""
    return np.stack([_texture(rng, size) for _ in range(count)])


def make_pseudo_anomaly_set(rng: np.random.Generator, count: int, size: int):
    """A :class:`PseudoAnomalySet` of ``count`` textures, every other one with a painted spot."""
    from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet

    normals = make_normals(rng, count, size)
    images, masks = normals.copy(), np.zeros((count, size, size), np.uint8)
    labels = np.arange(count) % 2
    for i in np.flatnonzero(labels):
        images[i], mask = _defect(normals[i], rng, "spot")
        masks[i] = mask > 0
    return PseudoAnomalySet(normals, images, masks, labels.astype(np.int64), (np.arange(count) * 2 // count).astype(np.int64))


def make_folder_drop(root: Path, category: str = "part", *, n_good: int = 8, defects=None, size: int = 64, seed: int = 1) -> Path:
    """Write a factory drop (good/, defect/<type>/, masks/<type>/) under ``root/category``."""
    rng = np.random.default_rng(seed)
    defects = {"crack": 3} if defects is None else defects
    folder = root / category
    for i in range(n_good):
        write_image(folder / "good" / f"g{i:03d}.png", _texture(rng, size))
    for kind, count in defects.items():
        for i in range(count):
            image, mask = _defect(_texture(rng, size), rng, "scratch")
            write_image(folder / "defect" / kind / f"d{i:03d}.png", image)
            write_image(folder / "masks" / kind / f"d{i:03d}.png", mask)
    return folder


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec"
    make_mvtec_category(root)
    return root


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "drop"
    make_folder_drop(root)
    return root


class DatasetFactory:
    """Access to the generators from tests (conftest is not importable under importlib mode)."""

    mvtec_category = staticmethod(make_mvtec_category)
    folder_drop = staticmethod(make_folder_drop)
    write_image = staticmethod(write_image)
    normals = staticmethod(make_normals)
    pseudo_anomaly_set = staticmethod(make_pseudo_anomaly_set)


@pytest.fixture
def datasets() -> type[DatasetFactory]:
    return DatasetFactory


@pytest.fixture(scope="session")
def tiny_model_parts() -> dict:
    """A real but tiny fitted model (DFD + kNN bank + fusion) at 32 px, built once per session.

    What a ``dfd`` run hands to the model bundle, in seconds instead of a pipeline run: DFD
    trained for one meta-epoch on 8 pseudo-anomalies, a kNN bank on 2 supports, the fusion and
    threshold fitted on 8 validation samples by the scoring stage's own node.
    """
    from fsad_pipeline.models.dfd_training import DFDTrainConfig
    from fsad_pipeline.pipelines.scoring.nodes import fit_score_fusion
    from fsad_pipeline.scoring.dfd_scorer import DFDScorer, FeatureConfig
    from fsad_pipeline.scoring.patch_scorers import fit_patch_scorers

    size = 32
    rng = np.random.default_rng(0)
    train, validation = make_pseudo_anomaly_set(rng, 8, size), make_pseudo_anomaly_set(rng, 8, size)
    support = make_normals(rng, 2, size)
    features = FeatureConfig(pretrain_dim=16, target_dim=16, image_size=size, batch_size=8)
    dfd = DFDScorer.fit(
        train, validation, features=features, device="cpu", progress=False,
        train_config=DFDTrainConfig(meta_epochs=1, epochs=1, gaussian_hidden=16, seed=0),
    )
    patch, patch_validation = fit_patch_scorers(
        support, features, knn={"coreset_ratio": 0.5, "num_neighbors": 3, "backend": "torch"},
        gaussian={"enabled": False}, anomalous_bank={"top_fraction": 0.1}, n_supports=2,
        validation_images=validation.images, validation_sources=validation.source_index, progress=False,
    )
    fusion = fit_score_fusion(
        dfd, patch, patch_validation, support, validation, None, None,
        {"n_trials": 5, "min_gain": 0.005, "pixel_weight": 0.0, "search": True},
        {"method": "target_fpr", "target_false_alarm_rate": 0.05}, {"enabled": False}, {"max_pixels": 10**8},
        size, 0, "cpu",
    )
    return {"dfd_model": dfd, "patch_scorers": patch, "fusion": fusion, "support_images": support, "image_size": size}
