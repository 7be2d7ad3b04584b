"""Defect-type classification: fit the classifier and its two baselines, classify images.

``fit_defect_type_classifiers`` builds the pseudo defect classes on the support normals,
pretrains the residual encoder on them (residual = synthetic minus its clean source),
fine-tunes it on the labelled defect shots (residual = shot minus its nearest normal bank
patch) and fits three :class:`PrototypeClassifier` s on the shots:

* ``classifier`` — the pretrained (and fine-tuned) :class:`ResidualEncoder`;
* ``residual_prototype`` — pooled residuals, no learning (is pretraining worth it?);
* ``feature_prototype`` — pooled plain backbone features (are residuals worth it?).

Everything is saved in one folder (``defect_types.json`` + one safetensors/JSON sub-folder per
classifier), like :class:`~fsad_pipeline.scoring.patch_scorers.PatchScorerSet`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fsad_pipeline.models.defect_classifier import (
    ClassPrediction,
    PooledEmbedder,
    PretrainConfig,
    PrototypeClassifier,
    ResidualEncoder,
    fine_tune,
    paired_residuals,
    pretrain,
    residual_features,
)
from fsad_pipeline.models.features import PatchFeatureExtractor, extract_features
from fsad_pipeline.models.memory_bank import MemoryBankScorer, NearestNeighbourIndex
from fsad_pipeline.scoring.dfd_scorer import FeatureConfig
from fsad_pipeline.synthesis.pseudo_classes import build_pseudo_class_set
from fsad_pipeline.synthesis.textures import TextureBank

logger = logging.getLogger(__name__)

CLASSIFIER = "classifier"
RESIDUAL_BASELINE = "residual_prototype"
FEATURE_BASELINE = "feature_prototype"
METHODS = (CLASSIFIER, RESIDUAL_BASELINE, FEATURE_BASELINE)
CONFIG_FILE = "defect_types.json"
#: Random stream of the pseudo defect classes (the synthesis stage uses 1 and 2).
PSEUDO_CLASS_STREAM = 3

Bank = NearestNeighbourIndex | MemoryBankScorer | Tensor | np.ndarray


@dataclass
class DefectTypeConfig:
    """Everything the classification stage can tune (``parameters_classification.yml``)."""

    samples_per_class: int = 30
    mask_kinds: tuple[str, ...] = ("perlin", "blob")
    beta_range: tuple[float, float] = (0.0, 0.8)
    area_range: tuple[float, float] = (0.10, 0.40)
    perlin_threshold: float = 0.35
    encoder: dict[str, Any] = field(
        default_factory=lambda: {"hidden_channels": [256, 128], "embed_dim": 128, "pooling": "mean", "input_pool": 2}
    )
    pretrain: dict[str, Any] = field(default_factory=dict)
    fine_tune: dict[str, Any] = field(default_factory=lambda: {"epochs": 45, "lr": 1e-4})
    baseline_pooling: str = "mean"
    temperature: float = 0.07
    open_set: bool = True
    unknown_margin: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DefectTypeConfig:
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown classification options: {sorted(unknown)}")
        for key in ("mask_kinds", "beta_range", "area_range"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class DefectTypeClassifiers:
    """The fitted classifier and baselines, with the feature recipe they expect."""

    features: FeatureConfig
    classifiers: dict[str, PrototypeClassifier]
    info: dict = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return next(iter(self.classifiers.values())).class_names if self.classifiers else []

    def classify(self, features: Tensor, bank: Bank) -> dict[str, ClassPrediction]:
        """Every method's prediction for patch features (N, C, h, w) of the images to classify."""
        needs_residuals = any(c.input_kind == "residual" for c in self.classifiers.values())
        residuals = residual_features(features, bank) if needs_residuals and len(features) else features
        return {
            name: classifier.predict(residuals if classifier.input_kind == "residual" else features)
            for name, classifier in self.classifiers.items()
        }

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"features": asdict(self.features), "classifiers": list(self.classifiers), "info": self.info}
        (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        for name, classifier in self.classifiers.items():
            classifier.save(directory / name)

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu") -> DefectTypeClassifiers:
        directory = Path(directory)
        payload = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        classifiers = {name: PrototypeClassifier.load(directory / name, device=device) for name in payload["classifiers"]}
        return cls(FeatureConfig.from_dict(payload["features"]), classifiers, payload.get("info", {}))


def fit_defect_type_classifiers(
    support_images: np.ndarray,
    shot_images: np.ndarray,
    shot_types: Sequence[str],
    textures: TextureBank,
    bank: Bank,
    features: FeatureConfig,
    config: DefectTypeConfig | None = None,
    *,
    extractor: PatchFeatureExtractor | None = None,
    foreground_masks: np.ndarray | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> DefectTypeClassifiers:
    """Pretrain on pseudo defect classes, fine-tune on the shots, fit all three methods.

    ``support_images`` are the clean normals (k, H, W, 3) the pseudo classes are pasted on;
    ``shot_images``/``shot_types`` the labelled defect shots; ``bank`` the normal memory bank
    of the same ``features`` (the fitted kNN scorer of the memory_bank stage).
    """
    config = config or DefectTypeConfig()
    shot_types = [str(t) for t in shot_types]
    if len(shot_images) != len(shot_types) or not shot_types:
        raise ValueError(f"need one type per defect shot, got {len(shot_images)} images and {len(shot_types)} types")
    extractor = extractor or features.build_extractor()
    common = dict(image_size=features.image_size, batch_size=features.batch_size, device=device, dual_path=False)
    info: dict[str, Any] = {"config": config.to_dict(), "shots_per_type": {t: shot_types.count(t) for t in sorted(set(shot_types))}}

    started = time.perf_counter()
    pseudo = build_pseudo_class_set(
        support_images,
        textures,
        np.random.default_rng([int(seed), PSEUDO_CLASS_STREAM]),
        samples_per_class=int(config.samples_per_class),
        mask_kinds=config.mask_kinds,
        beta_range=config.beta_range,
        area_range=config.area_range,
        perlin_threshold=float(config.perlin_threshold),
        foreground_masks=foreground_masks,
        progress=progress,
    )
    source_features = extract_features(extractor, np.asarray(support_images), progress=progress, desc="features (normals)", **common)
    pseudo_features = extract_features(extractor, pseudo.images, progress=progress, desc="features (pseudo classes)", **common)
    pseudo_residuals = paired_residuals(pseudo_features, source_features, pseudo.source_index).to(torch.float16)
    del pseudo_features
    info["pseudo_classes"] = {"names": pseudo.class_names, "samples": len(pseudo), "seconds": time.perf_counter() - started}

    torch.manual_seed(int(seed))
    encoder = ResidualEncoder(pseudo_residuals.shape[1], **config.encoder)
    pretrain_config = PretrainConfig.from_dict({**config.pretrain, "seed": int(seed), "temperature": config.temperature})
    pretrain_result = pretrain(encoder, pseudo_residuals, pseudo.labels, pretrain_config, device=device, progress=progress)
    del pseudo_residuals
    info["pretrain"] = pretrain_result.summary()

    shot_features = extract_features(extractor, np.asarray(shot_images), progress=progress, desc="features (defect shots)", **common)
    shot_residuals = residual_features(shot_features, bank)
    names = sorted(set(shot_types))
    labels = np.array([names.index(t) for t in shot_types])
    tuned = copy.deepcopy(encoder)
    fine_tune_result = fine_tune(
        tuned, shot_residuals, labels, temperature=config.temperature, seed=int(seed), device=device, progress=progress,
        **config.fine_tune,
    )
    info["fine_tune"] = fine_tune_result.summary()

    options = dict(temperature=config.temperature, open_set=config.open_set, unknown_margin=config.unknown_margin, device=device)
    classifiers = {
        CLASSIFIER: PrototypeClassifier(tuned, input_kind="residual", **options).fit(shot_residuals, shot_types),
        RESIDUAL_BASELINE: PrototypeClassifier(PooledEmbedder(pooling=config.baseline_pooling), input_kind="residual", **options).fit(
            shot_residuals, shot_types
        ),
        FEATURE_BASELINE: PrototypeClassifier(PooledEmbedder(pooling=config.baseline_pooling), input_kind="features", **options).fit(
            shot_features, shot_types
        ),
    }
    info["seconds"] = time.perf_counter() - started
    return DefectTypeClassifiers(features, classifiers, info)


__all__ = [
    "CLASSIFIER",
    "DefectTypeClassifiers",
    "DefectTypeConfig",
    "FEATURE_BASELINE",
    "METHODS",
    "RESIDUAL_BASELINE",
    "fit_defect_type_classifiers",
]
