"""DFD as a scorer: frozen backbone features of both frequency paths + trained discriminators.

``DFDScorer.fit`` extracts the backbone features of every pseudo-anomalous training sample once
(the backbone is frozen, so caching is exact and saves almost all of the compute), trains the
adaptor and discriminators on them, selects the meta-epoch and freezes the map normalisation on
the synthetic validation split, and calibrates the decision threshold there too.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsad_pipeline.data.geometry import as_hw
from fsad_pipeline.models.anomaly_map import DFDAnomalyMapGenerator, NormalizationStats
from fsad_pipeline.models.backbones import build_backbone
from fsad_pipeline.models.dfd import DFDModel
from fsad_pipeline.models.dfd_training import (
    CachedFeatures,
    DFDTrainConfig,
    TrainResult,
    ValidationFeatures,
    load_dfd,
    save_dfd,
    score_dfd,
    train_dfd,
)
from fsad_pipeline.models.features import PatchFeatureExtractor, extract_features, select_device
from fsad_pipeline.scoring.base import ScoreBatch
from fsad_pipeline.scoring.calibration import calibrate_threshold
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet

#: Bumped whenever the saved layout changes; loading refuses other versions.
SCORER_FORMAT_VERSION = 1
SCORER_CONFIG_FILE = "scorer.json"


@dataclass
class FeatureConfig:
    """How patch features are computed (must match between training and scoring)."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights_path: str | None = None
    patch_size: int = 3
    pretrain_dim: int = 128
    target_dim: int = 128
    image_size: int | list[int] = 256  # an int: square; [H, W]: the working size (see data.geometry)
    batch_size: int = 16
    out_indices: list[int] | None = None  # backbone stages / ViT blocks; None: the backbone's default
    input_size: int | None = None  # ViT backbones: internal resolution; None: the backbone's default

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def build_extractor(self) -> PatchFeatureExtractor:
        backbone = build_backbone(
            self.backbone,
            pretrained=self.pretrained,
            weights_path=self.weights_path,
            out_indices=None if self.out_indices is None else [int(i) for i in self.out_indices],
            input_size=None if self.input_size is None else int(self.input_size),
        )
        return PatchFeatureExtractor(
            backbone, patch_size=self.patch_size, pretrain_dim=self.pretrain_dim, target_dim=self.target_dim
        )


@dataclass
class DFDScorer:
    """A fitted DFD model with everything needed to score new images."""

    features: FeatureConfig
    model: DFDModel
    train_config: DFDTrainConfig
    stats: NormalizationStats
    threshold: dict
    device: str = "cpu"
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    name: str = "dfd"

    def __post_init__(self) -> None:
        self.image_size = as_hw(self.features.image_size)
        self._extractor: PatchFeatureExtractor | None = None
        self._generator = DFDAnomalyMapGenerator(
            self.image_size, self.train_config.map_sigma, fusion_weights=self.train_config.fusion_weights
        )

    @property
    def extractor(self) -> PatchFeatureExtractor:
        if self._extractor is None:
            self._extractor = self.features.build_extractor()
        return self._extractor

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        train_samples: PseudoAnomalySet,
        validation_samples: PseudoAnomalySet,
        *,
        features: FeatureConfig,
        train_config: DFDTrainConfig,
        threshold_method: str = "f1_max",
        target_false_alarm_rate: float = 0.05,
        device: str = "auto",
        progress: bool = True,
        extractor: PatchFeatureExtractor | None = None,
    ) -> DFDScorer:
        torch_device = select_device(device)
        extractor = extractor or features.build_extractor()
        started = time.perf_counter()
        train = _training_features(extractor, train_samples, features, torch_device, progress)
        validation = _validation_features(extractor, validation_samples, features, torch_device, progress)
        feature_seconds = time.perf_counter() - started
        result: TrainResult = train_dfd(train, train_config, validation=validation, device=torch_device, progress=progress)
        outputs = score_dfd(
            result.model, validation.low, validation.high, result.map_generator, result.stats, device=torch_device
        )
        threshold = calibrate_threshold(
            validation.labels.numpy(),
            outputs["pred_score"].numpy(),
            method=threshold_method,
            target_false_alarm_rate=target_false_alarm_rate,
        )
        scorer = cls(
            features=features,
            model=result.model.cpu(),
            train_config=train_config,
            stats=result.stats,
            threshold=threshold,
            device=str(torch_device),
            history=result.history,
            info={
                "feature_seconds": feature_seconds,
                "train_seconds": result.train_seconds + feature_seconds,
                "best_meta_epoch": result.best_meta_epoch,
                "training_samples": len(train_samples),
                "validation_samples": len(validation_samples),
                "feature_dim": extractor.feature_dim,
                "grid": list(train.grid),
            },
        )
        scorer._extractor = extractor
        return scorer

    # ------------------------------------------------------------------ scoring
    def score(self, images: np.ndarray) -> ScoreBatch:
        """Score uint8 RGB images (B, H, W, 3); returns numpy maps (B, H, W) and scores (B,)."""
        device = select_device(self.device)
        low, high = extract_features(
            self.extractor,
            images,
            image_size=self.features.image_size,
            batch_size=self.features.batch_size,
            device=device,
            progress=False,
        )
        outputs = score_dfd(self.model, low, high, self._generator, self.stats, device=device)
        return {
            "anomaly_map": outputs["anomaly_map"].numpy().astype(np.float32),
            "pred_score": outputs["pred_score"].numpy().astype(np.float32),
        }

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        save_dfd(directory, self.model, self.train_config, self.stats, extra={"features": asdict(self.features)})
        payload = {
            "format_version": SCORER_FORMAT_VERSION,
            "name": self.name,
            "features": asdict(self.features),
            "threshold": self.threshold,
            "history": self.history,
            "info": self.info,
        }
        (directory / SCORER_CONFIG_FILE).write_text(json.dumps(payload, indent=2, default=float))

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "auto") -> DFDScorer:
        directory = Path(directory)
        config_path = directory / SCORER_CONFIG_FILE
        if not config_path.exists():
            raise FileNotFoundError(f"{directory} holds no trained DFD model ({SCORER_CONFIG_FILE} missing)")
        payload = json.loads(config_path.read_text())
        if payload.get("format_version") != SCORER_FORMAT_VERSION:
            raise ValueError(
                f"{directory}: model format version {payload.get('format_version')!r}, "
                f"this code reads version {SCORER_FORMAT_VERSION}; retrain the model"
            )
        model, train_config, stats, _ = load_dfd(directory)
        return cls(
            features=FeatureConfig.from_dict(payload["features"]),
            model=model,
            train_config=train_config,
            stats=stats,
            threshold=payload["threshold"],
            device=str(select_device(device)),
            history=payload.get("history", []),
            info=payload.get("info", {}),
        )


def _training_features(
    extractor: PatchFeatureExtractor, samples: PseudoAnomalySet, features: FeatureConfig, device, progress: bool
) -> CachedFeatures:
    """Backbone features of every training sample (rotated normal and augmented), both paths."""
    common = dict(image_size=features.image_size, batch_size=features.batch_size, device=device, progress=progress)
    # Without rotation every sample of a support shares one clean image: extract each distinct
    # image once (k instead of k * n_per_image forwards) and index the features per sample.
    first, inverse = distinct_images(samples.normals)
    distinct = torch.from_numpy(inverse)
    normal_low, normal_high = extract_features(extractor, samples.normals[first], desc="features (normal)", **common)
    normal_low, normal_high = normal_low[distinct], normal_high[distinct]
    aug_low, aug_high = extract_features(extractor, samples.images, desc="features (augmented)", **common)
    return CachedFeatures(
        normal_low=normal_low,
        normal_high=normal_high,
        aug_low=aug_low,
        aug_high=aug_high,
        masks=_masks_at(samples.masks, features.image_size),
        labels=torch.from_numpy(samples.labels.astype(np.float32)),
    )


def distinct_images(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the first occurrence of each distinct image and, per image, its distinct index.

    ``images[first][inverse]`` equals ``images`` (byte-identical rows are one image).
    """
    seen: dict[bytes, int] = {}
    first: list[int] = []
    inverse = np.empty(len(images), dtype=np.int64)
    for row, image in enumerate(images):
        key = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()
        if key not in seen:
            seen[key] = len(first)
            first.append(row)
        inverse[row] = seen[key]
    return np.asarray(first, dtype=np.int64), inverse


def _validation_features(
    extractor: PatchFeatureExtractor, samples: PseudoAnomalySet, features: FeatureConfig, device, progress: bool
) -> ValidationFeatures:
    low, high = extract_features(
        extractor,
        samples.images,
        image_size=features.image_size,
        batch_size=features.batch_size,
        device=device,
        progress=progress,
        desc="features (validation)",
    )
    return ValidationFeatures(
        low=low,
        high=high,
        masks=_masks_at(samples.masks, features.image_size),
        labels=torch.from_numpy(samples.labels.astype(np.float32)),
    )


def _masks_at(masks: np.ndarray, image_size: int | list[int]) -> torch.Tensor:
    tensor = torch.from_numpy(masks.astype(np.float32))
    size = as_hw(image_size)
    if tuple(tensor.shape[1:]) != size:
        tensor = torch.nn.functional.interpolate(tensor[:, None], size=size, mode="nearest")[:, 0]
    return tensor
