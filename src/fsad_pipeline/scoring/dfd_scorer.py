"""DFD as a scorer: frozen backbone features of both frequency paths + trained discriminators.

``DFDScorer.fit`` extracts the backbone features of every pseudo-anomalous training sample once
(the backbone is frozen, so caching is exact and saves almost all of the compute), trains the
adaptor and discriminators on them, selects the meta-epoch and freezes the map normalisation on
the synthetic validation split, and calibrates the decision threshold there too.

**Cross-fitting** (``cross_fit_folds`` >= 2, at least two support images, and a validation made
from the supports; one made from unseen good images needs none): the supports are
split into that many groups and one DFD *validator* member is trained per group on every other
group's samples (it selects its meta-epoch and freezes its normalisation on the validation rows
of those same supports, as a single model does on all of them), then scores the validation rows
made from its left-out group. The validation rows therefore get *held-out* DFD scores (the
model that scores a row never saw the support image the row was made from), as the memory-bank
scorers' leave-one-support-out scores are: a single DFD model trained on every support scores its
own supports in-sample, and measured on the real-data suite its validation then ranked it first
on every object category while the test ranked it first on none.

New images are scored by the *scoring* members: with ``cross_fit_scoring: full`` (default) one
more member trained on every support, as without cross-fitting (training then costs about twice
one model at two folds); with ``members`` the validators' mean map (no extra training, but at
k = 2 each validator learns from one image: textile test image AUROC 0.687 against 0.785 for
the model that sees both).
"""

from __future__ import annotations

import hashlib
import logging
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fsad_pipeline.data.geometry import as_hw
from fsad_pipeline.models.anomaly_map import DFDAnomalyMapGenerator, NormalizationStats
from fsad_pipeline.models.backbones import build_backbone
from fsad_pipeline.models.dfd import DFDModel
from fsad_pipeline.models.dfd_training import (
    REFERENCE_WEIGHTS,
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
from fsad_pipeline.models.precision import resolve_precision
from fsad_pipeline.scoring.base import ScoreBatch
from fsad_pipeline.scoring.calibration import calibrate_threshold
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet

logger = logging.getLogger(__name__)

#: Bumped whenever the saved layout changes; loading refuses versions it cannot read.
SCORER_FORMAT_VERSION = 2
#: Versions this code still reads (1: one model saved at the folder's top level).
READABLE_FORMAT_VERSIONS = (1, 2)
SCORER_CONFIG_FILE = "scorer.json"
#: Sub-folder of member ``i`` of a cross-fitted scorer.
MEMBER_DIR = "member_{}"
#: What scores new images after cross-fitting: a member on every support, or the validators' mean.
CROSS_FIT_SCORING = ("full", "members")


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
    precision: str = "fp32"  # fp32 | bf16 | auto: bfloat16 autocast of the feature pass (models.precision)

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
            backbone, patch_size=self.patch_size, pretrain_dim=self.pretrain_dim, target_dim=self.target_dim,
            precision=self.precision,
        )


@dataclass
class DFDMember:
    """One trained DFD model, its frozen map normalisation and the support images it never saw."""

    model: DFDModel
    stats: NormalizationStats
    held_out: list[int] = field(default_factory=list)  # support indices left out of its training (a validator)
    map_weights: tuple[float, float] = REFERENCE_WEIGHTS  # (Perlin, Gaussian) weights of its anomaly map
    score_weights: tuple[float, float] = REFERENCE_WEIGHTS  # ... and of the map whose maximum is its image score


def support_folds(n_supports: int, folds: int | None) -> list[list[int]]:
    """The support groups of a cross-fit: ``folds`` near-equal contiguous groups of support indices.

    Fewer than two supports or folds: ``[[]]`` (one member trained on everything, nothing held
    out). ``folds`` larger than the supports gives leave-one-support-out.
    """
    if folds is None or int(folds) < 2 or n_supports < 2:
        return [[]]
    count = min(int(folds), n_supports)
    return [group.tolist() for group in np.array_split(np.arange(n_supports), count)]


@dataclass
class DFDScorer:
    """A fitted DFD scorer: its scoring member(s) (maps averaged) and any cross-fitted validators."""

    features: FeatureConfig
    members: list[DFDMember]
    train_config: DFDTrainConfig
    threshold: dict
    device: str = "cpu"
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    name: str = "dfd"

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a DFD scorer needs at least one trained member")
        self.image_size = as_hw(self.features.image_size)
        self._extractor: PatchFeatureExtractor | None = None
        self._generator = DFDAnomalyMapGenerator(self.image_size, self.train_config.map_sigma)

    @property
    def extractor(self) -> PatchFeatureExtractor:
        if self._extractor is None:
            self._extractor = self.features.build_extractor()
        return self._extractor

    @property
    def cross_fitted(self) -> bool:
        """Whether validators left supports out (validation rows get held-out scores)."""
        return any(member.held_out for member in self.members)

    @property
    def scoring_members(self) -> list[DFDMember]:
        """The members that score new images: those trained on every support, else all of them."""
        return [m for m in self.members if not m.held_out] or list(self.members)

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
        cross_fit_folds: int | None = None,
        cross_fit_scoring: str = "full",
        device: str = "auto",
        progress: bool = True,
        extractor: PatchFeatureExtractor | None = None,
    ) -> DFDScorer:
        """Train one member, or ``cross_fit_folds`` cross-fitted validators plus (``cross_fit_scoring``
        ``full``) one member on every support (see the module docstring).

        The samples' ``source_index`` says which support image each row was made from. Features
        of every sample are extracted once and shared by the members.
        """
        if cross_fit_scoring not in CROSS_FIT_SCORING:
            raise ValueError(f"cross_fit_scoring must be one of {CROSS_FIT_SCORING}, got {cross_fit_scoring!r}")
        torch_device = select_device(device)
        extractor = extractor or features.build_extractor()
        started = time.perf_counter()
        train = _training_features(extractor, train_samples, features, torch_device, progress)
        validation = _validation_features(extractor, validation_samples, features, torch_device, progress)
        feature_seconds = time.perf_counter() - started
        n_supports = int(max(train_samples.source_index.max(initial=-1), validation_samples.source_index.max(initial=-1))) + 1
        groups = support_folds(n_supports, cross_fit_folds)
        if groups != [[]] and not (validation_samples.source_index >= 0).any():
            # Made from good images that are no support: every row is held out already.
            logger.info("DFD: the validation is made from unseen good images; one model, no cross-fit")
            groups = [[]]
        if groups != [[]] and cross_fit_scoring == "full":
            groups.append([])  # the scoring member, trained on every support
        members: list[DFDMember] = []
        history: list[dict] = []
        best_epochs: list[int] = []
        train_seconds = feature_seconds
        outputs = {"anomaly_map": torch.zeros(len(validation), *train.image_size), "pred_score": torch.zeros(len(validation))}
        for index, held_out in enumerate(groups):
            train_rows = _rows_outside(train_samples.source_index, held_out)
            # Meta-epoch selection and the map normalisation use the validation rows of the
            # member's own supports (as a single model uses all of them); the held-out rows are
            # only scored. Selecting on the held-out rows was tried: with k = 2 they are one
            # normal image against ~10 pseudo-anomalies, and the noisy criterion stopped a member
            # after its first meta-epoch (textile).
            select_rows = _rows_outside(validation_samples.source_index, held_out)
            val_rows = _rows_inside(validation_samples.source_index, held_out)
            if held_out and (train_rows.numel() == 0 or val_rows.numel() == 0 or select_rows.numel() == 0):
                raise ValueError(f"cross-fit fold {index} (supports {held_out}) has no training or validation rows")
            fold_train = train.subset(train_rows)
            if len(groups) > 1:
                role = f"validator without supports {held_out}" if held_out else "scoring member on every support"
                logger.info("DFD member %d/%d: %s", index + 1, len(groups), role)
            result: TrainResult = train_dfd(
                fold_train, train_config, validation=validation.subset(select_rows), device=torch_device,
                progress=progress,
            )
            scored = score_dfd(
                result.model, validation.low[val_rows], validation.high[val_rows], result.map_generator,
                result.stats, device=torch_device, compute_dtype=resolve_precision(train_config.precision, torch_device),
            )
            if held_out or len(groups) == 1:  # a scoring member beside validators scores no validation row
                outputs["anomaly_map"][val_rows] = scored["anomaly_map"]
                outputs["pred_score"][val_rows] = scored["pred_score"]
            members.append(
                DFDMember(
                    result.model.cpu(), result.stats, list(held_out),
                    result.config.fusion_weights, result.config.score_weights,  # training sets both
                )
            )
            history.extend({**record, "member": index} for record in result.history)
            best_epochs.append(result.best_meta_epoch)
            train_seconds += result.train_seconds
        threshold = calibrate_threshold(
            validation.labels.numpy(),
            outputs["pred_score"].numpy(),
            method=threshold_method,
            target_false_alarm_rate=target_false_alarm_rate,
        )
        scorer = cls(
            features=features,
            members=members,
            train_config=train_config,
            threshold=threshold,
            device=str(torch_device),
            history=history,
            info={
                "feature_seconds": feature_seconds,
                "train_seconds": train_seconds,
                "best_meta_epoch": best_epochs[0] if len(best_epochs) == 1 else best_epochs,
                "members": len(members),
                "path_weights": [
                    {"map": list(member.map_weights), "score": list(member.score_weights)} for member in members
                ],
                "held_out_supports": [member.held_out for member in members],
                "training_samples": len(train_samples),
                "validation_samples": len(validation_samples),
                "feature_dim": extractor.feature_dim,
                "grid": list(train.grid),
            },
        )
        scorer._extractor = extractor
        return scorer

    # ------------------------------------------------------------------ scoring
    def _features(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_features(
            self.extractor,
            images,
            image_size=self.features.image_size,
            batch_size=self.features.batch_size,
            device=select_device(self.device),
            progress=False,
        )

    def _member_outputs(self, member: DFDMember, low: torch.Tensor, high: torch.Tensor) -> dict[str, torch.Tensor]:
        """A member's outputs, its discriminators run in the precision they were trained in."""
        device = select_device(self.device)
        return score_dfd(
            member.model, low, high, self._generator, member.stats, weights=member.map_weights,
            score_weights=member.score_weights, device=device,
            compute_dtype=resolve_precision(self.train_config.precision, device),
        )

    def _mean_outputs(self, low: torch.Tensor, high: torch.Tensor) -> ScoreBatch:
        """The scoring members' mean map; image score = the maximum of their mean image-score map (the
        anomaly map unless a member scores images with other path weights); one member: its own output."""
        members = self.scoring_members
        if len(members) == 1:
            outputs = self._member_outputs(members[0], low, high)
            maps, scores = outputs["anomaly_map"], outputs["pred_score"]
        else:
            outputs = [self._member_outputs(m, low, high) for m in members]
            maps = torch.stack([o["anomaly_map"] for o in outputs]).mean(dim=0)
            scores = torch.stack([o["score_map"] for o in outputs]).mean(dim=0).flatten(1).amax(dim=1)
        return {"anomaly_map": maps.numpy().astype(np.float32), "pred_score": scores.numpy().astype(np.float32)}

    def score(self, images: np.ndarray) -> ScoreBatch:
        """Score uint8 RGB images (B, H, W, 3); returns numpy maps (B, H, W) and scores (B,)."""
        low, high = self._features(images)
        return self._mean_outputs(low, high)

    def score_held_out(self, images: np.ndarray, sources: Sequence[int]) -> ScoreBatch:
        """Score validation images, each by the validator that never saw its support image.

        ``sources[i]`` is the support image row ``i`` was made from (−1: none, e.g. a labelled
        defect view); rows no validator held out (and every row of a scorer that is not
        cross-fitted) are scored as :meth:`score` scores new images.
        """
        sources = np.asarray(sources, dtype=np.int64)
        if len(sources) != len(images):
            raise ValueError(f"{len(sources)} sources for {len(images)} images")
        low, high = self._features(images)
        result = self._mean_outputs(low, high)
        if not self.cross_fitted:
            return result
        for member in (m for m in self.members if m.held_out):
            rows = np.flatnonzero(np.isin(sources, member.held_out))
            if rows.size:
                index = torch.from_numpy(rows)
                own = self._member_outputs(member, low[index], high[index])
                result["anomaly_map"][rows] = own["anomaly_map"].numpy()
                result["pred_score"][rows] = own["pred_score"].numpy()
        return result

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        extra = {"features": asdict(self.features)}
        for index, member in enumerate(self.members):
            # the weights it scores with
            config = replace(self.train_config, fusion_weights=member.map_weights, score_weights=member.score_weights)
            save_dfd(directory / MEMBER_DIR.format(index), member.model, config, member.stats, extra=extra)
        payload = {
            "format_version": SCORER_FORMAT_VERSION,
            "name": self.name,
            "features": asdict(self.features),
            "members": [{"folder": MEMBER_DIR.format(i), "held_out": m.held_out} for i, m in enumerate(self.members)],
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
        version = payload.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"{directory}: model format version {version!r}, "
                f"this code reads versions {list(READABLE_FORMAT_VERSIONS)}; retrain the model"
            )
        # Version 1: one model at the folder's top level.
        entries = payload.get("members") or [{"folder": ".", "held_out": []}]
        members, train_config = [], None
        for entry in entries:
            folder = (directory / entry["folder"]).resolve()
            if directory.resolve() not in (folder, *folder.parents):
                raise ValueError(f"{directory}: member folder {entry['folder']!r} lies outside the model folder")
            model, train_config, stats, _ = load_dfd(folder)
            members.append(
                DFDMember(
                    model, stats, [int(i) for i in entry.get("held_out", [])], train_config.fusion_weights,
                    train_config.score_weights or train_config.fusion_weights,
                )
            )
        return cls(
            features=FeatureConfig.from_dict(payload["features"]),
            members=members,
            train_config=train_config,
            threshold=payload["threshold"],
            device=str(select_device(device)),
            history=payload.get("history", []),
            info=payload.get("info", {}),
        )


def score_held_out_in_chunks(
    scorer: DFDScorer, images: np.ndarray, sources: Sequence[int], *, chunk_size: int = 32, progress: bool = True
) -> ScoreBatch:
    """:meth:`DFDScorer.score_held_out` over an in-memory image array, ``chunk_size`` at a time."""
    from tqdm.auto import tqdm

    sources = np.asarray(sources, dtype=np.int64)
    starts = range(0, len(images), chunk_size)
    chunks = [
        scorer.score_held_out(images[start : start + chunk_size], sources[start : start + chunk_size])
        for start in tqdm(starts, desc="DFD (validation)", unit="batch", disable=not progress or len(starts) < 2)
    ]
    if not chunks:
        return {"anomaly_map": np.zeros((0, *scorer.image_size), np.float32), "pred_score": np.zeros(0, np.float32)}
    return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in ("anomaly_map", "pred_score")}


def _rows_outside(sources: np.ndarray, held_out: Sequence[int]) -> torch.Tensor:
    """Rows whose support image is not held out (all rows when nothing is)."""
    return torch.from_numpy(np.flatnonzero(~np.isin(np.asarray(sources), list(held_out))))


def _rows_inside(sources: np.ndarray, held_out: Sequence[int]) -> torch.Tensor:
    """Rows made from a held-out support image (all rows when nothing is held out)."""
    if not held_out:
        return torch.arange(len(sources))
    return torch.from_numpy(np.flatnonzero(np.isin(np.asarray(sources), list(held_out))))


def _cache_dtype(features: FeatureConfig, device) -> torch.dtype:
    """The dtype DFD's cached training and validation features are kept in.

    A feature pass under bfloat16 autocast (``features.precision``) ends in bfloat16 values (its
    last step, the patch aggregation, runs in bfloat16), so keeping them as bfloat16 loses
    nothing and halves the cache: at KolektorSDD's 640 × 256 the four float32 maps of its 160
    training samples (k = 2) alone are 0.84 GB. Every reader casts a batch back to float32
    (``_gather_batch``, ``compute_path_maps``). A float32 feature pass is kept in float32.
    """
    return resolve_precision(features.precision, device) or torch.float32


def _training_features(
    extractor: PatchFeatureExtractor, samples: PseudoAnomalySet, features: FeatureConfig, device, progress: bool
) -> CachedFeatures:
    """Backbone features of every training sample (rotated normal and augmented), both paths."""
    common = dict(image_size=features.image_size, batch_size=features.batch_size, device=device, progress=progress,
                  dtype=_cache_dtype(features, device))
    # Without rotation every sample of a support shares one clean image: extract each distinct
    # image once (k instead of k * n_per_image forwards) and keep it once (CachedFeatures.normal_index).
    first, inverse = distinct_images(samples.normals)
    normal_low, normal_high = extract_features(extractor, samples.normals[first], desc="features (normal)", **common)
    aug_low, aug_high = extract_features(extractor, samples.images, desc="features (augmented)", **common)
    return CachedFeatures(
        normal_low=normal_low,
        normal_high=normal_high,
        aug_low=aug_low,
        aug_high=aug_high,
        masks=_masks_at(samples.masks, features.image_size),
        labels=torch.from_numpy(samples.labels.astype(np.float32)),
        normal_index=torch.from_numpy(inverse),
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
        dtype=_cache_dtype(features, device),
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
