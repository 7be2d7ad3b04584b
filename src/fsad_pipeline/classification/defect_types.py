"""Defect-type classification: fit the classifier and its two baselines, classify images.

``fit_defect_type_classifiers`` builds the pseudo defect classes on the support normals,
pretrains the residual encoder on them (residual = synthetic minus its clean source),
fine-tunes it on the labelled defect shots (residual = shot minus its nearest normal bank
patch) and fits three :class:`PrototypeClassifier` s on the shots:

* ``classifier`` — the pretrained (and fine-tuned) :class:`ResidualEncoder`;
* ``residual_prototype`` — pooled residuals, no learning (is pretraining worth it?);
* ``feature_prototype`` — pooled plain backbone features (are residuals worth it?).

Everything is saved in one folder (``defect_types.json``, the normal bank as ``bank.npy`` and
one safetensors/JSON sub-folder per classifier), like
:class:`~fsad_pipeline.scoring.patch_scorers.PatchScorerSet`; :func:`load_defect_classifier`
reads it back for the model bundle.
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
from tqdm.auto import tqdm

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
BANK_FILE = "bank.npy"
#: Random stream of the pseudo defect classes (the synthesis stage uses 1 and 2).
PSEUDO_CLASS_STREAM = 3
#: Feature batches of pseudo-class images held at once while their residuals are taken.
RESIDUAL_CHUNK_BATCHES = 4

Bank = NearestNeighbourIndex | MemoryBankScorer | Tensor | np.ndarray


#: Keys of ``parameters_classification.yml`` that steer the pipeline, not the classifier.
PIPELINE_KEYS = ("enabled", "classify")


@dataclass
class DefectTypeConfig:
    """Everything the classifier can tune (``classification`` in ``parameters_classification.yml``)."""

    pseudo_classes: dict[str, Any] = field(
        default_factory=lambda: {
            "samples_per_class": 30,
            "mask_kinds": ["perlin", "blob"],
            "beta_range": [0.0, 0.8],
            "area_range": [0.10, 0.40],
            "perlin_threshold": 0.35,
        }
    )
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
        """Build from the parameters; unknown keys raise (a typo must not silently do nothing)."""
        data = {k: v for k, v in (data or {}).items() if k not in PIPELINE_KEYS}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown classification options: {sorted(unknown)}")
        defaults = cls()
        for key in ("pseudo_classes", "encoder", "fine_tune"):  # partial overrides keep the other defaults
            if key in data:
                data[key] = {**getattr(defaults, key), **dict(data[key])}
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class DefectTypeClassifiers:
    """The fitted classifier and baselines, with the feature recipe and normal bank they need.

    Self-contained (it keeps its own copy of the normal bank vectors the residuals are taken
    against), so the model bundle can carry it as its ``classifier`` component: :meth:`predict`
    is the bundle's ``DefectTypePredictor`` contract.
    """

    features: FeatureConfig
    classifiers: dict[str, PrototypeClassifier]
    bank: np.ndarray | None = None  # (M, C) float32 normal bank of the residuals
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index: NearestNeighbourIndex | None = None
        self._extractor: PatchFeatureExtractor | None = None
        self.device = "cpu"

    @property
    def class_names(self) -> list[str]:
        return next(iter(self.classifiers.values())).class_names if self.classifiers else []

    @property
    def index(self) -> NearestNeighbourIndex:
        if self._index is None:
            if self.bank is None:
                raise RuntimeError("no normal bank: the classifiers were not fitted")
            self._index = NearestNeighbourIndex().build(self.bank)
        return self._index

    @property
    def extractor(self) -> PatchFeatureExtractor:
        if self._extractor is None:
            self._extractor = self.features.build_extractor()
        return self._extractor

    def image_features(self, images: np.ndarray, *, progress: bool = False) -> Tensor:
        """Patch features (N, C, h, w) of uint8 RGB images with this classifier's recipe."""
        return extract_features(
            self.extractor, np.asarray(images), image_size=self.features.image_size, batch_size=self.features.batch_size,
            device=self.device, dual_path=False, progress=progress, desc="features (classification)",
        )

    def classify(self, features: Tensor) -> dict[str, ClassPrediction]:
        """Every method's prediction for patch features (N, C, h, w) of the images to classify."""
        needs_residuals = any(c.input_kind == "residual" for c in self.classifiers.values())
        residuals = residual_features(features, self.index) if needs_residuals and len(features) else features
        return {
            name: classifier.predict(residuals if classifier.input_kind == "residual" else features)
            for name, classifier in self.classifiers.items()
        }

    def predict(self, images: np.ndarray, anomaly_maps: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The classifier's type, probability and runner-up for images flagged NG (bundle contract).

        ``anomaly_maps`` are accepted for the contract but not used: the residual map already
        says where and how the image departs from the normals.
        """
        if not self.classifiers:
            raise RuntimeError("no defect-type classifier was fitted")
        prediction = self.classify(self.image_features(images))[CLASSIFIER]
        return {name: np.asarray(values, dtype=object if name != "pred_defect_probability" else float)
                for name, values in prediction.columns().items()}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"features": asdict(self.features), "classifiers": list(self.classifiers), "info": self.info}
        (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        if self.bank is not None:
            np.save(directory / BANK_FILE, np.ascontiguousarray(self.bank, dtype=np.float32), allow_pickle=False)
        for name, classifier in self.classifiers.items():
            classifier.save(directory / name)

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu") -> DefectTypeClassifiers:
        directory = Path(directory)
        payload = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        classifiers = {name: PrototypeClassifier.load(directory / name, device=device) for name in payload["classifiers"]}
        bank = np.load(directory / BANK_FILE, allow_pickle=False) if (directory / BANK_FILE).exists() else None
        loaded = cls(FeatureConfig.from_dict(payload["features"]), classifiers, bank, payload.get("info", {}))
        loaded.device = device
        return loaded


def bundle_component(classifiers: DefectTypeClassifiers | None) -> DefectTypeClassifiers | None:
    """What a model bundle carries: the classifier when one was fitted (shots existed), else nothing."""
    return classifiers if classifiers is not None and classifiers.classifiers else None


def load_defect_classifier(directory: str | Path) -> DefectTypeClassifiers:
    """The model bundle's loader for its ``classifier`` component."""
    return DefectTypeClassifiers.load(directory)


def _bank_vectors(bank: Bank) -> np.ndarray:
    if isinstance(bank, MemoryBankScorer):
        return bank.bank
    if isinstance(bank, NearestNeighbourIndex):
        if bank.bank is None:
            raise RuntimeError("the nearest-neighbour index is not built")
        return bank.bank
    return np.ascontiguousarray(bank.detach().cpu().numpy() if isinstance(bank, Tensor) else bank, dtype=np.float32)


def _pseudo_class_residuals(
    extractor: PatchFeatureExtractor,
    images: np.ndarray,
    source_features: Tensor,
    source_index: Sequence[int],
    common: dict[str, Any],
    *,
    progress: bool = True,
) -> Tensor:
    """:func:`paired_residuals` of the pseudo-class images as float16, extracted a few batches at a time.

    Extracted whole, the float32 features of every pseudo-class image and their float32
    difference were the run's peak memory (2 × 0.47 GB for 300 images at 384 × 32 × 32; the
    default run's peak rose from 2.36 to 2.88 GiB in this node, KolektorSDD's from 4.1 to
    5.1 GiB). A chunk is a whole number of feature batches, so every batch, and every feature,
    is the one a single pass makes.
    """
    batch_size = int(common["batch_size"])
    chunk = batch_size * RESIDUAL_CHUNK_BATCHES
    index = np.asarray(source_index)
    residuals = torch.empty((len(images), *source_features.shape[1:]), dtype=torch.float16)
    for start in tqdm(range(0, len(images), chunk), desc="features (pseudo classes)", disable=not progress, unit="chunk"):
        stop = min(start + chunk, len(images))
        features = extract_features(extractor, images[start:stop], progress=False, **common)
        residuals[start:stop] = paired_residuals(features, source_features, index[start:stop])
    return residuals


def pretrain_residual_encoder(
    support_images: np.ndarray,
    textures: TextureBank,
    extractor: PatchFeatureExtractor,
    features: FeatureConfig,
    config: DefectTypeConfig | None = None,
    *,
    foreground_masks: np.ndarray | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[ResidualEncoder, dict[str, Any]]:
    """Build the pseudo defect classes on the normals and pretrain a :class:`ResidualEncoder` on them.

    Residual = features of the synthetic image minus those of its own clean source normal, so
    only what the pasted texture changed remains. Independent of the labelled shots, so a
    benchmark can pretrain once and fit several shot draws on the result.
    """
    config = config or DefectTypeConfig()
    common = dict(image_size=features.image_size, batch_size=features.batch_size, device=device, dual_path=False)
    started = time.perf_counter()
    recipe = config.pseudo_classes
    pseudo = build_pseudo_class_set(
        support_images,
        textures,
        np.random.default_rng([int(seed), PSEUDO_CLASS_STREAM]),
        samples_per_class=int(recipe["samples_per_class"]),
        mask_kinds=tuple(recipe["mask_kinds"]),
        beta_range=tuple(recipe["beta_range"]),
        area_range=tuple(recipe["area_range"]),
        perlin_threshold=float(recipe["perlin_threshold"]),
        foreground_masks=foreground_masks,
        progress=progress,
    )
    source_features = extract_features(extractor, np.asarray(support_images), progress=progress, desc="features (normals)", **common)
    residuals = _pseudo_class_residuals(extractor, pseudo.images, source_features, pseudo.source_index, common, progress=progress)
    synthesis_seconds = time.perf_counter() - started

    torch.manual_seed(int(seed))
    encoder = ResidualEncoder(residuals.shape[1], **config.encoder)
    pretrain_config = PretrainConfig.from_dict({**config.pretrain, "seed": int(seed), "temperature": config.temperature})
    result = pretrain(encoder, residuals, pseudo.labels, pretrain_config, device=device, progress=progress)
    info = {
        "pseudo_classes": {"names": pseudo.class_names, "samples": len(pseudo), "seconds": synthesis_seconds},
        "pretrain": result.summary(),
        "pretrain_history": result.history,
    }
    return encoder, info


def fit_on_shots(
    encoder: ResidualEncoder,
    shot_features: Tensor,
    shot_types: Sequence[str],
    bank: Bank,
    features: FeatureConfig,
    config: DefectTypeConfig | None = None,
    *,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> DefectTypeClassifiers:
    """Fine-tune a copy of ``encoder`` on the shots and fit the classifier and both baselines.

    ``shot_features`` are the shots' patch features (N, C, h, w) of ``features``; their
    residuals are taken against the normal ``bank``.
    """
    config = config or DefectTypeConfig()
    shot_types = [str(t) for t in shot_types]
    if shot_features.shape[0] != len(shot_types) or not shot_types:
        raise ValueError(f"need one type per defect shot, got {shot_features.shape[0]} shots and {len(shot_types)} types")
    started = time.perf_counter()
    shot_residuals = residual_features(shot_features, bank)
    names = sorted(set(shot_types))
    tuned = copy.deepcopy(encoder)
    fine_tune_result = fine_tune(
        tuned, shot_residuals, np.array([names.index(t) for t in shot_types]), temperature=config.temperature,
        seed=int(seed), device=device, progress=progress, **config.fine_tune,
    )
    options = dict(temperature=config.temperature, open_set=config.open_set, unknown_margin=config.unknown_margin, device=device)

    def baseline(input_kind: str) -> PrototypeClassifier:
        return PrototypeClassifier(PooledEmbedder(pooling=config.baseline_pooling), input_kind=input_kind, **options)

    classifiers = {
        CLASSIFIER: PrototypeClassifier(tuned, input_kind="residual", **options).fit(shot_residuals, shot_types),
        RESIDUAL_BASELINE: baseline("residual").fit(shot_residuals, shot_types),
        FEATURE_BASELINE: baseline("features").fit(shot_features, shot_types),
    }
    info = {
        "config": config.to_dict(),
        "shots_per_type": {t: shot_types.count(t) for t in names},
        "fine_tune": fine_tune_result.summary(),
        "fit_seconds": time.perf_counter() - started,
    }
    return DefectTypeClassifiers(features, classifiers, _bank_vectors(bank), info)


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
    if len(shot_images) != len(shot_types) or len(shot_types) == 0:
        raise ValueError(f"need one type per defect shot, got {len(shot_images)} images and {len(shot_types)} types")
    extractor = extractor or features.build_extractor()
    encoder, pretrain_info = pretrain_residual_encoder(
        support_images, textures, extractor, features, config,
        foreground_masks=foreground_masks, seed=seed, device=device, progress=progress,
    )
    shot_features = extract_features(
        extractor, np.asarray(shot_images), image_size=features.image_size, batch_size=features.batch_size,
        device=device, dual_path=False, progress=progress, desc="features (defect shots)",
    )
    fitted = fit_on_shots(encoder, shot_features, shot_types, bank, features, config, seed=seed, device=device, progress=progress)
    fitted.info.update({k: v for k, v in pretrain_info.items() if k != "pretrain_history"})
    return fitted


__all__ = [
    "CLASSIFIER",
    "DefectTypeClassifiers",
    "DefectTypeConfig",
    "bundle_component",
    "FEATURE_BASELINE",
    "METHODS",
    "RESIDUAL_BASELINE",
    "fit_defect_type_classifiers",
    "fit_on_shots",
    "load_defect_classifier",
    "pretrain_residual_encoder",
]
