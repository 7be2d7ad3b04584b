"""Category-agnostic base training of a registration encoder (RegAD recipe, CPU budget).

Pairs are two different good images of one base category, one side augmented (rotation,
translation, flip, colour — the transforms of ``synthesis/support_augmentation.py`` with random
parameters). Both go through the :class:`~fsad_pipeline.models.registration.RegistrationEncoder`;
the registered deepest stage goes through the Siamese heads and SimSiam's symmetric negative
cosine with stop-gradient pulls the two registered feature maps together position by position,
which is what teaches the STNs to register the images.

CPU budget:

* the stages before the first STN never train, so their outputs are computed once for every
  image and augmented view and cached; each step only runs the later stages;
* a fixed number of augmented views per image (re-drawn pairings every epoch) makes that cache
  possible;
* channels-last tensors (depthwise-convolution backward is ~10x faster that way with oneDNN) and
  an optional thread count (on a CPU shared with other jobs, one thread is much faster than two).

Checkpoint selection never looks at the target category: after every epoch (and before the
first, i.e. the plain ImageNet backbone) the memory-bank score of each base category's held-back
good images and their pseudo-anomalies (``synthesis/anomalies.py``) is measured, bank = a few of
that category's training images; the epoch with the best mean of image and pixel AUROC wins.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fsad_pipeline.evaluation.metrics import image_auroc, pixel_auroc
from fsad_pipeline.models.anomaly_map import patch_scores_to_map
from fsad_pipeline.models.features import PatchAggregator, select_device
from fsad_pipeline.models.registration import (
    EncoderConfig,
    RegistrationEncoder,
    SiameseHead,
    build_registration_encoder,
    save_encoder,
    siamese_loss,
)
from fsad_pipeline.synthesis import support_augmentation as views
from fsad_pipeline.synthesis.anomalies import build_pseudo_anomaly_set
from fsad_pipeline.synthesis.textures import TextureBank

logger = logging.getLogger(__name__)


@dataclass
class PairAugmentation:
    """Random view of the augmented side of a pair (uniform ranges, probabilities)."""

    max_rotation_deg: float = 45.0
    max_translation: float = 0.2  # affine_grid units (0.2 = 10 % of the size), as RegAD's largest shift
    hflip_probability: float = 0.5
    brightness: tuple[float, float] = (0.8, 1.2)
    contrast: tuple[float, float] = (0.8, 1.2)
    grayscale_probability: float = 0.1

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = views.rotate(image, rng.uniform(-self.max_rotation_deg, self.max_rotation_deg))
        shift = rng.uniform(-self.max_translation, self.max_translation, size=2)
        out = views.translate(out, float(shift[0]), float(shift[1]))
        if rng.random() < self.hflip_probability:
            out = views.horizontal_flip(out)
        out = views.adjust_brightness(out, rng.uniform(*self.brightness))
        out = views.adjust_contrast(out, rng.uniform(*self.contrast))
        if rng.random() < self.grayscale_probability:
            out = views.to_grayscale(out)
        return out


@dataclass
class ValidationConfig:
    """Checkpoint selection on the base categories' own held-back images."""

    support_images: int = 4  # memory bank per category: this many of its training images
    anomalies_per_image: int = 2  # pseudo-anomalies made from each held-back good image
    foreground: str = "auto"
    feature_dim: int = 384  # patch features as the memory bank computes them
    patch_size: int = 3
    map_sigma: float = 4.0
    include_initial: bool = True  # the untrained encoder (= the plain backbone) is a candidate


@dataclass
class BaseTrainingConfig:
    """Hyperparameters of :func:`train_registration_encoder`."""

    image_size: int = 256
    epochs: int = 10
    batch_size: int = 16  # pairs per step
    views_per_image: int = 4  # cached augmented views per training image
    optimizer: str = "adam"  # adam | sgd (RegAD: SGD, lr 1e-4, momentum 0.9)
    lr: float = 1.0e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    backbone_lr_scale: float = 0.1  # learning-rate factor of the backbone stages after the first STN
    train_backbone: bool = True  # False: only the STNs, the attention and the heads learn
    head_dim: int = 256
    head_hidden: int = 128
    augmentation: PairAugmentation = field(default_factory=PairAugmentation)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    seed: int = 0
    num_threads: int | None = None  # torch threads during training (null: torch's default)
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.augmentation, Mapping):
            self.augmentation = PairAugmentation(**self.augmentation)
        if isinstance(self.validation, Mapping):
            self.validation = ValidationConfig(**self.validation)
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, got {self.optimizer!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaseTrainingConfig:
        known = {item.name for item in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown base-training options: {sorted(unknown)}")
        return cls(**data)


@dataclass
class TrainedEncoder:
    """A trained encoder ready to be registered (``save`` writes safetensors + JSON)."""

    name: str
    encoder: RegistrationEncoder
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    training: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Any) -> None:
        save_encoder(
            directory, self.encoder, name=self.name, mean=self.mean, std=self.std,
            image_size=self.image_size, training=self.training,
        )


@dataclass
class _CategoryCache:
    """Cached prefix features of one base category."""

    originals: Tensor  # (n, C, h, w) prefix outputs of the training images
    views: Tensor  # (n, V, C, h, w) of their augmented views


@dataclass
class _ValidationSet:
    name: str
    support: Tensor  # prefix features
    queries: Tensor
    labels: np.ndarray
    masks: np.ndarray  # (M, H, W)


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _to_batch(images: np.ndarray, mean: Tensor, std: Tensor) -> Tensor:
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return ((batch - mean) / std).contiguous(memory_format=torch.channels_last)


def _prefix_features(
    encoder: RegistrationEncoder, images: np.ndarray, mean: Tensor, std: Tensor, batch_size: int, device: torch.device
) -> Tensor:
    """Frozen prefix outputs of uint8 images (N, H, W, 3), on CPU."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = _to_batch(images[start : start + batch_size], mean, std).to(device)
            chunks.append(encoder.prefix(batch).cpu())
    return torch.cat(chunks).contiguous(memory_format=torch.channels_last)


def _set_modes(encoder: RegistrationEncoder, heads: nn.Module, training: bool) -> None:
    """Backbone stages always in eval (frozen BatchNorm statistics); STNs and heads follow ``training``."""
    encoder.train(training)
    heads.train(training)
    for stage in encoder.stages:
        stage.eval()


def _build_optimizer(
    encoder: RegistrationEncoder, heads: nn.Module, config: BaseTrainingConfig
) -> torch.optim.Optimizer:
    for parameter in encoder.stages.parameters():
        parameter.requires_grad_(False)
    groups = [{"params": [*encoder.registration_parameters(), *heads.parameters()], "lr": config.lr}]
    if config.train_backbone:
        backbone = list(encoder.backbone_parameters())
        for parameter in backbone:
            parameter.requires_grad_(True)
        groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_scale})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)


def _epoch_pairs(sizes: Mapping[str, int], views_per_image: int, rng: np.random.Generator) -> list[tuple[str, int, int, int]]:
    """(category, plain image a, augmented image b ≠ a, view of b) for every training image, shuffled."""
    pairs = []
    for name, count in sizes.items():
        for anchor in range(count):
            other = anchor if count == 1 else int((anchor + rng.integers(1, count)) % count)
            pairs.append((name, anchor, other, int(rng.integers(views_per_image))))
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def _validation_sets(
    encoder: RegistrationEncoder,
    categories: Mapping[str, Mapping[str, np.ndarray]],
    textures: TextureBank,
    config: BaseTrainingConfig,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
) -> list[_ValidationSet]:
    """Per base category: bank images, held-back goods + their pseudo-anomalies (prefix-cached)."""
    sets = []
    options = config.validation
    for index, (name, parts) in enumerate(sorted(categories.items())):
        held_back = parts["validation"]
        if len(held_back) == 0:
            logger.info("base category %s has no held-back images: not used for checkpoint selection", name)
            continue
        rng = np.random.default_rng([config.seed, 7, index])
        anomalies = build_pseudo_anomaly_set(
            list(held_back), options.anomalies_per_image, rng, textures,
            foreground=options.foreground, anomaly_probability=1.0, rotation_range=(0.0, 0.0), progress=False,
        )
        queries = np.concatenate([held_back, anomalies.images])
        labels = np.concatenate([np.zeros(len(held_back), np.int64), anomalies.labels])
        masks = np.concatenate([np.zeros(held_back.shape[:3], np.uint8), anomalies.masks])
        support = parts["train"][: options.support_images]
        sets.append(_ValidationSet(
            name,
            _prefix_features(encoder, support, mean, std, config.batch_size, device),
            _prefix_features(encoder, queries, mean, std, config.batch_size, device),
            labels,
            masks,
        ))
    return sets


def _patch_features(encoder: RegistrationEncoder, aggregator: PatchAggregator, prefix: Tensor, batch_size: int, device) -> Tensor:
    out = []
    for start in range(0, len(prefix), batch_size):
        out.append(aggregator(encoder.from_prefix(prefix[start : start + batch_size].to(device))[0]).cpu())
    return torch.cat(out)


def _nearest_distances(queries: Tensor, bank: Tensor, chunk: int = 4096) -> Tensor:
    out = []
    for start in range(0, len(queries), chunk):
        out.append(torch.cdist(queries[start : start + chunk], bank).min(dim=1).values)
    return torch.cat(out)


def validate(
    encoder: RegistrationEncoder, sets: Sequence[_ValidationSet], config: BaseTrainingConfig, device: torch.device
) -> dict[str, Any]:
    """Memory-bank (nearest-neighbour) image and pixel AUROC per validation category and their mean."""
    options = config.validation
    aggregator = PatchAggregator(
        encoder.channels, patch_size=options.patch_size, pretrain_dim=options.feature_dim, target_dim=options.feature_dim
    ).to(device)
    was_training = encoder.training
    encoder.eval()
    per_category: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for item in sets:
            support = _patch_features(encoder, aggregator, item.support, config.batch_size, device)
            queries = _patch_features(encoder, aggregator, item.queries, config.batch_size, device)
            dim, height, width = queries.shape[1:]
            bank = support.permute(0, 2, 3, 1).reshape(-1, dim)
            scores = _nearest_distances(queries.permute(0, 2, 3, 1).reshape(-1, dim), bank)
            maps = patch_scores_to_map(scores.view(-1, height, width), item.masks.shape[1:], options.map_sigma)
            image_scores = maps.flatten(1).max(dim=1).values.numpy()
            per_category[item.name] = {
                "image_auroc": image_auroc(item.labels, image_scores),
                "pixel_auroc": pixel_auroc(item.masks, maps.numpy()),
            }
    encoder.train(was_training)
    for stage in encoder.stages:
        stage.eval()
    image = float(np.nanmean([v["image_auroc"] for v in per_category.values()])) if per_category else float("nan")
    pixel = float(np.nanmean([v["pixel_auroc"] for v in per_category.values()])) if per_category else float("nan")
    return {"image_auroc": image, "pixel_auroc": pixel, "score": float(np.nanmean([image, pixel])), "per_category": per_category}


def train_registration_encoder(
    categories: Mapping[str, Mapping[str, np.ndarray]],
    encoder_config: EncoderConfig,
    config: BaseTrainingConfig,
    textures: TextureBank,
    *,
    name: str,
) -> tuple[TrainedEncoder, list[dict[str, Any]]]:
    """Train an encoder on base categories ``{name: {"train": (n,H,W,3), "validation": (m,H,W,3)}}``.

    Images must already be at ``config.image_size``. Returns the selected checkpoint (as a
    :class:`TrainedEncoder`) and the per-epoch history (epoch 0 = before training).
    """
    started = time.perf_counter()
    device = select_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 31])
    with _threads(config.num_threads):
        encoder, base = build_registration_encoder(encoder_config)
        heads = SiameseHead(encoder.channels[-1], config.head_dim, config.head_hidden)
        encoder = encoder.to(device=device, memory_format=torch.channels_last)
        heads = heads.to(device=device, memory_format=torch.channels_last)
        mean = torch.tensor(base.mean).view(1, 3, 1, 1)
        std = torch.tensor(base.std).view(1, 3, 1, 1)
        del base

        caches: dict[str, _CategoryCache] = {}
        trainable = {k: v for k, v in sorted(categories.items()) if len(v["train"])}
        for name_ in tqdm(trainable, desc="base training: caching features", disable=not config.progress, unit="category"):
            train_images = trainable[name_]["train"]
            augmented = np.stack(
                [config.augmentation(image, rng) for image in train_images for _ in range(config.views_per_image)]
            )
            originals = _prefix_features(encoder, train_images, mean, std, config.batch_size, device)
            augmented_features = _prefix_features(encoder, augmented, mean, std, config.batch_size, device)
            caches[name_] = _CategoryCache(
                originals, augmented_features.view(len(train_images), config.views_per_image, *originals.shape[1:])
            )
        validation_sets = _validation_sets(encoder, categories, textures, config, mean, std, device)
        cache_seconds = time.perf_counter() - started

        optimizer = _build_optimizer(encoder, heads, config)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
        history: list[dict[str, Any]] = []
        best_state: dict[str, Tensor] | None = None
        best_score = -math.inf
        best_epoch = -1

        def select(epoch: int, losses: list[float]) -> None:
            nonlocal best_state, best_score, best_epoch
            scores = validate(encoder, validation_sets, config, device) if validation_sets else {"score": float("nan")}
            entry = {
                "meta_epoch": epoch,
                "loss": float(np.mean(losses)) if losses else float("nan"),
                "val_image_auroc": scores.get("image_auroc"),
                "val_pixel_auroc": scores.get("pixel_auroc"),
                "val_score": scores["score"],
                "val_per_category": scores.get("per_category", {}),
                "seconds": time.perf_counter() - started,
            }
            history.append(entry)
            candidate = epoch > 0 or config.validation.include_initial
            score = entry["val_score"] if not math.isnan(entry["val_score"]) else -math.inf
            # Without validation data the last epoch is kept.
            if candidate and (score > best_score or (not validation_sets and epoch == config.epochs)):
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(encoder.state_dict())
            logger.info(
                "base training epoch %d: loss %.4f, validation image AUROC %s, pixel AUROC %s",
                epoch, entry["loss"], _fmt(entry["val_image_auroc"]), _fmt(entry["val_pixel_auroc"]),
            )

        select(0, [])
        sizes = {name_: len(cache.originals) for name_, cache in caches.items()}
        for epoch in tqdm(range(1, config.epochs + 1), desc="base training", disable=not config.progress, unit="epoch"):
            _set_modes(encoder, heads, True)
            pairs = _epoch_pairs(sizes, config.views_per_image, rng)
            losses = []
            steps = range(0, len(pairs), config.batch_size)
            for start in tqdm(steps, desc=f"epoch {epoch}", leave=False, disable=not config.progress, unit="step"):
                batch = pairs[start : start + config.batch_size]
                if len(batch) < 2:
                    continue  # BatchNorm in the heads needs more than one sample
                plain = torch.stack([caches[c].originals[a] for c, a, _, _ in batch])
                moved = torch.stack([caches[c].views[b, v] for c, _, b, v in batch])
                inputs = torch.cat([plain, moved]).to(device).contiguous(memory_format=torch.channels_last)
                registered = encoder.from_prefix(inputs, warp_back=False)[1][-1]
                z, p = heads(registered)
                half = len(batch)
                loss = siamese_loss(p[:half], z[:half], p[half:], z[half:])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            scheduler.step()
            select(epoch, losses)

    if best_state is not None:
        encoder.load_state_dict(best_state)
    encoder = encoder.to(memory_format=torch.contiguous_format).cpu().eval()
    seconds = time.perf_counter() - started
    training = {
        "selected_epoch": best_epoch,
        "selected_validation_score": best_score if best_score > -math.inf else None,
        "epochs": config.epochs,
        "seconds": seconds,
        "cache_seconds": cache_seconds,
        "categories": {k: {"train": len(v["train"]), "validation": len(v["validation"])} for k, v in categories.items()},
        "config": _jsonable(asdict(config)),
    }
    logger.info("base training done in %.1f min; selected epoch %d", seconds / 60, best_epoch)
    return TrainedEncoder(name, encoder, tuple(mean.flatten().tolist()), tuple(std.flatten().tolist()), config.image_size, training), history


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


__all__: list[str] = [
    "BaseTrainingConfig",
    "PairAugmentation",
    "TrainedEncoder",
    "ValidationConfig",
    "train_registration_encoder",
    "validate",
]
