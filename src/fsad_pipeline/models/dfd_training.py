"""Training, scoring and persistence of the DFD model on cached (frozen) backbone features.

Follows the reference schedule and losses (digest §6) with two deliberate deviations:

* Model selection after every meta-epoch uses a SYNTHETIC VALIDATION split. The reference
  selects the checkpoint with the best I-AUROC + P-AUROC + AUPRO on the TEST SET, which makes its
  reported numbers optimistic; the test set is never seen here.
* Normalisation statistics are frozen at training time (validation maps of the selected model)
  instead of being computed transductively over the test set (see
  :class:`~fsad_pipeline.models.anomaly_map.NormalizationStats`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from fsad_pipeline.evaluation.metrics import rank_auroc
from fsad_pipeline.models.anomaly_map import DFDAnomalyMapGenerator, NormalizationStats
from fsad_pipeline.models.dfd import (
    DFDModel,
    DFDModelConfig,
    gaussian_loss,
    perlin_loss,
    similarity_loss,
)
from fsad_pipeline.models.precision import PRECISIONS, autocast, resolve_precision

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILENAME = "dfd.safetensors"
CONFIG_FILENAME = "dfd_config.json"
PATHS = ("low", "high")
AUTO_WEIGHTS = "auto"
REFERENCE_WEIGHTS = (0.5, 0.5)
PERLIN_ONLY = (1.0, 0.0)
_LEARNT_BELOW = 0.9  # a Gaussian loss at or above this share of its collapse value is logged as "did not learn"


@dataclass
class DFDTrainConfig:
    """Hyperparameters of DFD training; defaults are the reference values (digest §6).

    Attributes:
        meta_epochs: outer loops; model selection runs after each (reference 20).
        epochs: inner passes over the training samples per meta-epoch (reference 4).
        batch_size: samples per optimiser step (reference 8).
        lr_adaptor: Adam lr of the feature adaptor, no weight decay (reference 5e-4).
        lr_gaussian: Adam lr of the Gaussian discriminator (reference 2e-4).
        lr_perlin: Adam lr of the Perlin discriminator (reference 1e-4).
        discriminator_weight_decay: weight decay of both discriminator groups (reference 1e-5).
        eta_min_ratio: cosine schedule floor as a fraction of ``lr_perlin`` (reference 0.4).
        noise_std: σ of the Gaussian feature noise (reference 0.015).
        margin: hinge margin of the Gaussian and Perlin losses (reference 0.5, not 0.8).
        gaussian_hidden: hidden width of the Gaussian discriminator (reference 1024).
        perlin_num_heads: ViT heads; ``None`` = dim // 96 adjusted to divide dim (16 at 1536).
        perlin_mlp_ratio: ViT MLP ratio (reference 4.0).
        perlin_depth: ViT blocks (reference 1).
        weight_gaussian, weight_perlin, weight_similarity: loss weights (reference 1 each).
        perlin_pixel_weight, perlin_image_weight: split of the Perlin loss (reference 0.5 / 0.5).
        map_sigma: σ of the anomaly-map Gaussian blur in pixels (reference 4).
        fusion_weights: (Perlin, Gaussian) weights of the fused map (reference 0.5 / 0.5), or
            ``"auto"``: chosen on the validation at every meta-epoch between the reference
            0.5 / 0.5 and the Perlin discriminator alone (:func:`choose_path_weights`), the map by
            pixel AUROC and, unless ``score_weights`` fixes it, the image score by image AUROC;
            ties keep the reference. The selected meta-epoch's choice is the model's
            (``TrainResult.config.fusion_weights`` and ``score_weights``).
        score_weights: (Perlin, Gaussian) weights of the map whose maximum is the image score;
            ``None``: ``fusion_weights`` (the reference: image score = max of the fused map; with
            ``"auto"``: chosen as well).
        stats_lower_percentile, stats_upper_percentile: ``None`` = min/max of the validation
            maps; a value in [0, 100] uses that percentile instead (robust option).
        scoring_batch_size: images per forward pass when scoring validation maps.
        gaussian_token_fraction: share of a batch's patch tokens that go through the Gaussian
            discriminator each step (reference 1.0: all of them). The Gaussian loss is a mean
            over independent tokens, so a random subset is an unbiased estimate of it; the
            discriminator (Linear → BatchNorm → LeakyReLU over a 1024-wide hidden layer on every
            token) was half of a training step's time (profile in the README).
        patience: stop once this many meta-epochs in a row have not beaten the best validation
            selection score (``None``: always run all ``meta_epochs``, as the reference does).
            The cosine schedule keeps its full length, so a run that does not stop early is
            the same with or without it.
        precision: ``fp32`` (the reference), ``bf16`` or ``auto``: the adaptor and the Perlin
            discriminator run under bfloat16 autocast (``auto``: only where the chip does
            bfloat16 natively; :mod:`fsad_pipeline.models.precision`). Parameters, optimiser
            state, the Gaussian discriminator and its noise and the losses stay float32. The
            validation maps and the scoring of new images run the adaptor and the Perlin path the
            same way (:func:`compute_path_maps`).
        seed: seeds model init, batch sampling and the feature noise.
    """

    meta_epochs: int = 20
    epochs: int = 4
    batch_size: int = 8
    lr_adaptor: float = 5e-4
    lr_gaussian: float = 2e-4
    lr_perlin: float = 1e-4
    discriminator_weight_decay: float = 1e-5
    eta_min_ratio: float = 0.4
    noise_std: float = 0.015
    margin: float = 0.5
    gaussian_hidden: int = 1024
    perlin_num_heads: int | None = None
    perlin_mlp_ratio: float = 4.0
    perlin_depth: int = 1
    weight_gaussian: float = 1.0
    weight_perlin: float = 1.0
    weight_similarity: float = 1.0
    perlin_pixel_weight: float = 0.5
    perlin_image_weight: float = 0.5
    map_sigma: float = 4.0
    fusion_weights: tuple[float, float] | str = (0.5, 0.5)
    score_weights: tuple[float, float] | None = None
    stats_lower_percentile: float | None = None
    stats_upper_percentile: float | None = None
    scoring_batch_size: int = 32
    gaussian_token_fraction: float = 1.0
    patience: int | None = None
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.fusion_weights, str):
            if self.fusion_weights != AUTO_WEIGHTS:
                raise ValueError(f"fusion_weights must be a (Perlin, Gaussian) pair or {AUTO_WEIGHTS!r}, got {self.fusion_weights!r}")
        else:
            self.fusion_weights = (float(self.fusion_weights[0]), float(self.fusion_weights[1]))
        if self.score_weights is not None:
            self.score_weights = (float(self.score_weights[0]), float(self.score_weights[1]))
        if self.meta_epochs < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("meta_epochs, epochs and batch_size must be >= 1")
        if not 0.0 < self.gaussian_token_fraction <= 1.0:
            raise ValueError(f"gaussian_token_fraction must be in (0, 1], got {self.gaussian_token_fraction}")
        if self.patience is not None and self.patience < 1:
            raise ValueError("patience must be >= 1 (or None: no early stopping)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def model_config(self) -> DFDModelConfig:
        """The architecture part of this config."""
        return DFDModelConfig(
            gaussian_hidden=self.gaussian_hidden,
            perlin_num_heads=self.perlin_num_heads,
            perlin_mlp_ratio=self.perlin_mlp_ratio,
            perlin_depth=self.perlin_depth,
        )

    @property
    def cosine_t_max(self) -> int:
        """Reference ``T_max = (meta_epochs − 1)·epochs`` (76 for 20×4).

        The scheduler is stepped ``meta_epochs·epochs`` times (80), i.e. past ``T_max``; the lr
        then climbs back up slightly, exactly as in the reference.
        """
        return max(1, (self.meta_epochs - 1) * self.epochs)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not isinstance(self.fusion_weights, str):
            data["fusion_weights"] = list(self.fusion_weights)
        if self.score_weights is not None:
            data["score_weights"] = list(self.score_weights)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DFDTrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DFDTrainConfig fields: {sorted(unknown)}")
        return cls(**data)


def _check_features(name: str, tensor: Tensor) -> None:
    if tensor.dim() != 4:
        raise ValueError(f"{name} must be (M, D, h, w), got shape {tuple(tensor.shape)}")


@dataclass
class CachedFeatures:
    """Training features: rotated clean image (normal_*) and its augmentation (aug_*) per sample.

    Shapes: aug features ``(M, D, h, w)``, masks ``(M, H, W)`` in {0, 1}, labels ``(M,)`` in {0, 1}.
    The normal features hold one row per distinct clean image, which sample ``i`` reads at row
    ``normal_index[i]`` (``(M,)``; omitted: one row per sample, ``arange(M)``). Without rotation
    the 80 samples of a support share one clean image, and 160 copies of two maps were half the cache.
    """

    normal_low: Tensor
    normal_high: Tensor
    aug_low: Tensor
    aug_high: Tensor
    masks: Tensor
    labels: Tensor
    normal_index: Tensor | None = None  # set to arange(M) when omitted

    def __post_init__(self) -> None:
        reference = tuple(self.aug_low.shape)
        # Omitted: one normal row per sample (their count must then match, checked below).
        normal_rows = reference[0] if self.normal_index is None else int(self.normal_low.shape[0])
        if self.normal_index is None:
            self.normal_index = torch.arange(reference[0])
        for name in ("normal_low", "normal_high", "aug_low", "aug_high"):
            tensor = getattr(self, name)
            _check_features(name, tensor)
            expected = (normal_rows, *reference[1:]) if name.startswith("normal") else reference
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")
        if tuple(self.normal_index.shape) != reference[:1] or bool(
            (self.normal_index < 0).any() | (self.normal_index >= normal_rows).any()
        ):
            raise ValueError(f"normal_index must be ({reference[0]},) rows of the {normal_rows} normal features")
        _check_masks_labels(self.masks, self.labels, reference[0])

    @property
    def dim(self) -> int:
        return int(self.normal_low.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.normal_low.shape[2]), int(self.normal_low.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    def __len__(self) -> int:
        return int(self.aug_low.shape[0])

    def subset(self, rows: Tensor) -> CachedFeatures:
        """The samples at ``rows`` (an index tensor); all of them when ``rows`` covers every sample."""
        if rows.numel() == len(self) and bool((rows == torch.arange(len(self))).all()):
            return self
        return CachedFeatures(
            self.normal_low, self.normal_high, self.aug_low[rows], self.aug_high[rows], self.masks[rows],
            self.labels[rows], self.normal_index[rows],
        )


@dataclass
class ValidationFeatures:
    """Synthetic validation split: features ``(V, D, h, w)``, masks ``(V, H, W)``, labels ``(V,)``."""

    low: Tensor
    high: Tensor
    masks: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        _check_features("low", self.low)
        _check_features("high", self.high)
        if self.low.shape != self.high.shape:
            raise ValueError(f"low {tuple(self.low.shape)} and high {tuple(self.high.shape)} differ")
        _check_masks_labels(self.masks, self.labels, int(self.low.shape[0]))

    def __len__(self) -> int:
        return int(self.low.shape[0])

    def subset(self, rows: Tensor) -> ValidationFeatures:
        """The rows at ``rows`` (an index tensor); all of them when ``rows`` covers every row."""
        if rows.numel() == len(self) and bool((rows == torch.arange(len(self))).all()):
            return self
        return ValidationFeatures(*(getattr(self, f.name)[rows] for f in fields(self)))


def _check_masks_labels(masks: Tensor, labels: Tensor, count: int) -> None:
    if masks.dim() != 3 or masks.shape[0] != count:
        raise ValueError(f"masks must be ({count}, H, W), got {tuple(masks.shape)}")
    if labels.dim() != 1 or labels.shape[0] != count:
        raise ValueError(f"labels must be ({count},), got {tuple(labels.shape)}")


@dataclass
class TrainResult:
    """Outcome of :func:`train_dfd`; ``model`` is the selected checkpoint, in eval mode."""

    model: DFDModel
    config: DFDTrainConfig
    stats: NormalizationStats
    history: list[dict[str, Any]]
    best_meta_epoch: int
    train_seconds: float
    image_size: tuple[int, int]
    map_generator: DFDAnomalyMapGenerator = field(repr=False)


# score_fn(outputs on the validation split, labels, masks) -> criterion to maximise, or None.
SelectionFn = Callable[[dict[str, Tensor], Tensor, Tensor], float | None]


# --------------------------------------------------------------------------------------------
# Loss of one batch
# --------------------------------------------------------------------------------------------


def path_losses(
    model: DFDModel,
    normal: Tensor,
    augmented: Tensor,
    masks: Tensor,
    labels: Tensor,
    config: DFDTrainConfig,
    noise_generator: torch.Generator | None = None,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Unweighted Gaussian, Perlin and similarity losses of one frequency path.

    * Gaussian: the projected features f of the UN-augmented (rotated) normal image and
      f + ε, ε ~ N(0, σ²), go through the Gaussian discriminator in ONE batch (so its BatchNorm
      sees real and noisy features together, as in the reference); with
      ``gaussian_token_fraction < 1`` a random subset of the tokens does.
    * Perlin: projected features of the augmented image; pixel + image loss on the mask.
    * Similarity: cosine of projected normal vs augmented features on anomalous patches.

    ``compute_dtype`` (e.g. ``torch.bfloat16``) autocasts the adaptor and the Perlin
    discriminator; their outputs come back as float32 before the noise and the losses.
    """
    batch, dim, height, width = normal.shape
    # One adaptor matmul for both images: exact, the adaptor has no batch statistics.
    both = torch.cat([normal, augmented])
    tokens = both.permute(0, 2, 3, 1).reshape(2 * batch, height * width, dim)
    with autocast(compute_dtype, tokens.device):
        projected = model.adaptor(tokens).float()
    proj_normal, proj_aug = projected[:batch], projected[batch:]

    real = proj_normal.reshape(-1, dim)
    if config.gaussian_token_fraction < 1.0:
        count = max(2, round(config.gaussian_token_fraction * real.shape[0]))
        keep = torch.randperm(real.shape[0], generator=noise_generator, device=real.device)[:count]
        real = real.index_select(0, keep)
    noise = torch.randn(
        real.shape, generator=noise_generator, device=real.device, dtype=real.dtype
    )
    # Float32 here even under autocast: the noise (σ 0.015) is finer than bfloat16's step at the
    # features' scale (2^-6 at 2-4), so the discriminator would see a rounded copy of it.
    with autocast(None, real.device):
        logits = model.gaussian(torch.cat([real, real + config.noise_std * noise]))
    loss_gaussian = gaussian_loss(logits[: real.shape[0]], logits[real.shape[0] :], config.margin)

    with autocast(compute_dtype, proj_aug.device):
        perlin_logits = model.perlin.forward_tokens(proj_aug).float().reshape(batch, height, width)
    loss_perlin = perlin_loss(
        perlin_logits,
        masks,
        labels,
        config.margin,
        pixel_weight=config.perlin_pixel_weight,
        image_weight=config.perlin_image_weight,
    )

    def channel_first(projected_tokens: Tensor) -> Tensor:
        return projected_tokens.reshape(batch, height, width, dim).permute(0, 3, 1, 2)

    loss_similarity = similarity_loss(channel_first(proj_normal), channel_first(proj_aug), masks)
    return {"gaussian": loss_gaussian, "perlin": loss_perlin, "similarity": loss_similarity}


def batch_loss(
    model: DFDModel,
    batch: dict[str, Tensor],
    config: DFDTrainConfig,
    noise_generator: torch.Generator | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Total loss Σ_{path ∈ low, high} [w_g·L_g + w_p·L_p + w_s·L_sim] and its parts (floats).

    ``batch`` holds normal_low, normal_high, aug_low, aug_high, masks, labels. The two paths run
    through the shared modules in SEPARATE forward passes, as in the reference: concatenating
    them would mix low- and high-frequency features in the BatchNorm statistics.
    ``compute_dtype``: see :func:`path_losses`.
    """
    parts = {"gaussian": 0.0, "perlin": 0.0, "similarity": 0.0}
    total: Tensor | None = None
    weights = {
        "gaussian": config.weight_gaussian,
        "perlin": config.weight_perlin,
        "similarity": config.weight_similarity,
    }
    for path in PATHS:
        losses = path_losses(
            model,
            batch[f"normal_{path}"],
            batch[f"aug_{path}"],
            batch["masks"],
            batch["labels"],
            config,
            noise_generator,
            compute_dtype,
        )
        for name, value in losses.items():
            weighted = weights[name] * value
            total = weighted if total is None else total + weighted
            parts[name] += float(value.detach())
    assert total is not None
    parts["total"] = float(total.detach())
    return total, parts


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def compute_path_maps(
    model: DFDModel,
    low: Tensor,
    high: Tensor,
    generator: DFDAnomalyMapGenerator,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Un-normalised (perlin_map, gaussian_map), each ``(N, H, W)`` on CPU; model in eval mode.

    ``compute_dtype``: the precision the model was trained in (``DFDTrainConfig.precision``,
    resolved), so that its validation during training, its normalisation statistics and its
    scores of new images all see the discriminators as training did (:meth:`DFDModel.path_logits`).
    """
    was_training = model.training
    model.eval()
    perlin_maps: list[Tensor] = []
    gaussian_maps: list[Tensor] = []
    try:
        with torch.inference_mode():
            for start in range(0, low.shape[0], batch_size):
                low_batch = low[start : start + batch_size].to(device, torch.float32)
                high_batch = high[start : start + batch_size].to(device, torch.float32)
                perlin_low, gaussian_low = model.patch_scores(low_batch, compute_dtype)
                perlin_high, gaussian_high = model.patch_scores(high_batch, compute_dtype)
                maps = generator.path_maps(perlin_low, perlin_high, gaussian_low, gaussian_high)
                perlin_maps.append(maps["perlin_map"].cpu())
                gaussian_maps.append(maps["gaussian_map"].cpu())
    finally:
        model.train(was_training)
    return torch.cat(perlin_maps), torch.cat(gaussian_maps)


def score_dfd(
    model: DFDModel,
    low: Tensor,
    high: Tensor,
    generator: DFDAnomalyMapGenerator,
    stats: NormalizationStats,
    *,
    weights: tuple[float, float] | None = None,
    score_weights: tuple[float, float] | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Score images from their cached low/high features ``(N, D, h, w)``; ``weights`` and
    ``score_weights`` (Perlin, Gaussian) override the generator's map and image-score weights;
    ``compute_dtype``: :func:`compute_path_maps`.

    Returns CPU tensors: anomaly_map (N, H, W), pred_score (N,), perlin_map, gaussian_map
    (N, H, W) and perlin_score, gaussian_score (N,) (un-normalised per-path maxima).
    """
    model.to(device)
    perlin_maps, gaussian_maps = compute_path_maps(
        model, low, high, generator, batch_size=batch_size, device=device, compute_dtype=compute_dtype
    )
    return generator.from_path_maps(perlin_maps, gaussian_maps, stats, weights, score_weights)


def _safe_auroc(targets: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, ``None`` for a single-class target, NaN for non-finite scores."""
    if np.unique(targets).size < 2:
        return None
    if not np.all(np.isfinite(scores)):
        return float("nan")
    return rank_auroc(targets > 0, scores)


def validation_metrics(
    outputs: dict[str, Tensor], labels: Tensor, masks: Tensor
) -> dict[str, float | None]:
    """Image AUROC (pred_score) and pixel AUROC (anomaly_map, masks > 0.5); None if undefined."""
    image_targets = (labels.cpu().numpy() > 0.5).astype(np.int64)
    pixel_targets = (masks.cpu().numpy() > 0.5).astype(np.int64).ravel()
    return {
        "image_auroc": _safe_auroc(image_targets, outputs["pred_score"].cpu().numpy()),
        "pixel_auroc": _safe_auroc(pixel_targets, outputs["anomaly_map"].cpu().numpy().ravel()),
    }


def default_selection_score(metrics: dict[str, float | None]) -> float | None:
    """Sum of the defined AUROCs (image + pixel); None when neither is defined."""
    values = (metrics["image_auroc"], metrics["pixel_auroc"])
    defined = [value for value in values if value is not None]
    return float(sum(defined)) if defined else None


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _build_optimisers(
    model: DFDModel, config: DFDTrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    adaptor_optimiser = torch.optim.Adam(model.adaptor.parameters(), lr=config.lr_adaptor)
    discriminator_optimiser = torch.optim.Adam(
        [
            {
                "params": model.gaussian.parameters(),
                "lr": config.lr_gaussian,
                "weight_decay": config.discriminator_weight_decay,
            },
            {
                "params": model.perlin.parameters(),
                "lr": config.lr_perlin,
                "weight_decay": config.discriminator_weight_decay,
            },
        ]
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        discriminator_optimiser,
        T_max=config.cosine_t_max,
        eta_min=config.eta_min_ratio * config.lr_perlin,
    )
    return adaptor_optimiser, discriminator_optimiser, scheduler


def _gather_batch(
    train: CachedFeatures, indices: Tensor, device: str | torch.device
) -> dict[str, Tensor]:
    normal = train.normal_index[indices]
    return {
        name: getattr(train, name).index_select(0, normal if name.startswith("normal") else indices).to(device, torch.float32)
        for name in ("normal_low", "normal_high", "aug_low", "aug_high", "masks", "labels")
    }


def _state_copy(model: DFDModel) -> dict[str, Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def gaussian_collapse_loss(config: DFDTrainConfig) -> float:
    """The summed (both paths) Gaussian loss of a discriminator that cannot tell f from f + ε.

    A discriminator whose output is the same for f and f + ε, any value c in [−m, m], scores
    ``relu(m − c) + relu(m + c) = 2m`` per path; no output that ignores the noise does better.
    """
    return 2.0 * float(config.margin) * len(PATHS)


def path_weight_candidates(config: DFDTrainConfig) -> list[tuple[float, float]]:
    """The (Perlin, Gaussian) weightings the validation chooses from for ``"auto"``: the reference
    0.5 / 0.5 (first: it wins ties) and the Perlin discriminator alone; none for fixed weights."""
    return [REFERENCE_WEIGHTS, PERLIN_ONLY] if isinstance(config.fusion_weights, str) else []


def configured_path_weights(config: DFDTrainConfig) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(map weights, score weights)`` a model starts from: the configured pairs, the reference
    for what ``"auto"`` leaves to the validation (what it keeps without one)."""
    map_weights = REFERENCE_WEIGHTS if isinstance(config.fusion_weights, str) else config.fusion_weights
    return map_weights, config.score_weights or map_weights


def choose_path_weights(
    generator: DFDAnomalyMapGenerator,
    perlin_maps: Tensor,
    gaussian_maps: Tensor,
    stats: NormalizationStats,
    validation: ValidationFeatures,
    candidates: list[tuple[float, float]],
    score_weights: tuple[float, float] | None = None,
) -> tuple[tuple[float, float], tuple[float, float], dict[str, float | None]]:
    """``(map weights, score weights, their metrics)``: the candidate with the best validation
    pixel AUROC for the map and, unless ``score_weights`` fixes it, the best image AUROC for the
    image score (the first on ties or when undefined).

    Why a choice (README, DFD section): at the reference noise σ = 0.015 on this project's
    128-d features (per-dimension std about 2.2) the Gaussian discriminator never learns in a
    few-shot schedule (its loss stays at :func:`gaussian_collapse_loss` on every real set), so
    its maps are an untrained projection of the features: they do not locate defects (test pixel
    AUROC 0.30-0.52 on four mask sets) yet its image-level response helped on three of six sets.
    """
    image_candidates = candidates if score_weights is None else [score_weights]
    image, pixel = [], []
    for weights in dict.fromkeys([*candidates, *image_candidates]):
        outputs = generator.from_path_maps(perlin_maps, gaussian_maps, stats, weights, weights)
        metrics = validation_metrics(outputs, validation.labels, validation.masks)
        if weights in candidates:
            pixel.append(metrics["pixel_auroc"])
        if weights in image_candidates:
            image.append(metrics["image_auroc"])

    def best(values: list[float | None]) -> int:
        defined = [(v, -i) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        return -max(defined)[1] if defined else 0

    map_index, score_index = best(pixel), best(image)
    return (
        candidates[map_index],
        image_candidates[score_index],
        {"image_auroc": image[score_index], "pixel_auroc": pixel[map_index]},
    )


def _maps_and_stats(
    model: DFDModel,
    low: Tensor,
    high: Tensor,
    generator: DFDAnomalyMapGenerator,
    config: DFDTrainConfig,
    device: str | torch.device,
    compute_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, NormalizationStats]:
    """Per-path maps of ``low``/``high`` features (in the training's ``compute_dtype``) and the
    normalisation statistics frozen from them."""
    perlin_maps, gaussian_maps = compute_path_maps(
        model, low, high, generator, batch_size=config.scoring_batch_size, device=device,
        compute_dtype=compute_dtype,
    )
    stats = NormalizationStats.from_maps(
        perlin_maps,
        gaussian_maps,
        lower_percentile=config.stats_lower_percentile,
        upper_percentile=config.stats_upper_percentile,
    )
    return perlin_maps, gaussian_maps, stats


def train_dfd(
    train: CachedFeatures,
    config: DFDTrainConfig | None = None,
    *,
    validation: ValidationFeatures | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    score_fn: SelectionFn | None = None,
) -> TrainResult:
    """Train DFD on cached features; select the meta-epoch on the synthetic validation split.

    Each inner epoch draws ``ceil(M / batch_size)`` batches from a seeded random permutation
    (the reference's shuffled loader); the discriminator cosine schedule steps once per inner
    epoch. After every meta-epoch the fused validation map is scored (stats from the validation
    maps themselves) and the model with the highest ``score_fn(outputs, labels, masks)``
    (default: image AUROC + pixel AUROC) is kept; with ``config.patience`` training stops once
    that many meta-epochs in a row bring no better score. Without validation, or when the criterion is
    undefined (single-class validation set), the last meta-epoch is kept and the statistics come
    from the validation maps or, without validation, from the normal training features.
    """
    config = config or DFDTrainConfig()
    device = torch.device(device)
    start_time = time.perf_counter()
    candidates = path_weight_candidates(config)
    best_weights = configured_path_weights(config)  # (map, score)
    generator = DFDAnomalyMapGenerator(train.image_size, config.map_sigma, fusion_weights=best_weights[0],
                                       score_weights=best_weights[1])
    if validation is not None:
        if validation.low.shape[1:] != train.normal_low.shape[1:]:
            raise ValueError("validation features do not match the training features' (D, h, w)")
        if tuple(validation.masks.shape[1:]) != train.image_size:
            raise ValueError("validation masks do not match the training image size")

    # Model init uses the global RNG: seed it, inside fork_rng so the caller's state survives.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = DFDModel(train.dim, train.grid, config.model_config())
    model.to(device).train()
    sample_generator = torch.Generator().manual_seed(config.seed)
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    adaptor_optimiser, discriminator_optimiser, scheduler = _build_optimisers(model, config)
    compute_dtype = resolve_precision(config.precision, device)
    if compute_dtype is not None:
        logger.info("DFD: training under %s autocast (precision %s on %s)", compute_dtype, config.precision, device)

    num_samples = len(train)
    steps_per_epoch = math.ceil(num_samples / config.batch_size)
    history: list[dict[str, Any]] = []
    best_score = -math.inf
    best_meta_epoch = -1
    best_state: dict[str, Tensor] | None = None
    best_stats: NormalizationStats | None = None

    bar = tqdm(range(config.meta_epochs), desc="DFD meta-epochs", disable=not progress)
    for meta_epoch in bar:
        epoch_start = time.perf_counter()
        sums = {"total": 0.0, "gaussian": 0.0, "perlin": 0.0, "similarity": 0.0}
        for _ in range(config.epochs):
            order = torch.randperm(num_samples, generator=sample_generator)
            for step in range(steps_per_epoch):
                indices = order[step * config.batch_size : (step + 1) * config.batch_size]
                batch = _gather_batch(train, indices, device)
                adaptor_optimiser.zero_grad(set_to_none=True)
                discriminator_optimiser.zero_grad(set_to_none=True)
                loss, parts = batch_loss(model, batch, config, noise_generator, compute_dtype)
                loss.backward()
                adaptor_optimiser.step()
                discriminator_optimiser.step()
                for name, value in parts.items():
                    sums[name] += value
            scheduler.step()
        num_steps = config.epochs * steps_per_epoch
        record: dict[str, Any] = {"meta_epoch": meta_epoch}
        record["loss"] = sums.pop("total") / num_steps
        record.update({f"loss_{name}": value / num_steps for name, value in sums.items()})
        record["lr_perlin"] = discriminator_optimiser.param_groups[1]["lr"]
        record["lr_gaussian"] = discriminator_optimiser.param_groups[0]["lr"]

        selection: float | None = None
        if validation is not None:
            perlin_maps, gaussian_maps, stats = _maps_and_stats(
                model, validation.low, validation.high, generator, config, device, compute_dtype
            )
            if candidates:
                map_weights, score_weights, metrics = choose_path_weights(
                    generator, perlin_maps, gaussian_maps, stats, validation, candidates, config.score_weights
                )
                generator.fusion_weights, generator.score_weights = map_weights, score_weights
            map_weights, score_weights = generator.fusion_weights, generator.score_weights  # both set at construction
            record["map_weights"], record["score_weights"] = list(map_weights), list(score_weights)
            # The fused outputs only where something reads them: choose_path_weights has the metrics.
            outputs = None
            if not candidates or score_fn is not None:
                outputs = generator.from_path_maps(perlin_maps, gaussian_maps, stats)
            record.update(metrics if candidates else validation_metrics(outputs, validation.labels, validation.masks))
            if score_fn is None:
                selection = default_selection_score(record)
            else:
                selection = score_fn(outputs, validation.labels, validation.masks)
            record["selection_score"] = selection
            if selection is not None:
                # A diverged (NaN) criterion never wins; ties keep the earlier epoch (reference).
                value = selection if math.isfinite(selection) else -math.inf
                if best_state is None or value > best_score:
                    best_score, best_meta_epoch = value, meta_epoch
                    best_state, best_stats = _state_copy(model), stats
                    best_weights = (map_weights, score_weights)
                record["early_stop"] = (
                    config.patience is not None and meta_epoch - best_meta_epoch >= config.patience
                )
            elif best_state is None:
                # Undefined criterion (single-class validation set): fall back to the last
                # meta-epoch, i.e. keep the current weights and these statistics.
                best_meta_epoch, best_stats, best_weights = meta_epoch, stats, (map_weights, score_weights)
        record["seconds"] = time.perf_counter() - epoch_start
        history.append(record)
        postfix = {"loss": f"{record['loss']:.4f}"}
        if record.get("image_auroc") is not None:
            postfix["val_iauroc"] = f"{record['image_auroc']:.3f}"
        bar.set_postfix(postfix)
        if record.get("early_stop"):
            logger.info(
                "DFD: no better validation score for %d meta-epochs; stopping after meta-epoch %d (best %d)",
                config.patience, meta_epoch, best_meta_epoch,
            )
            break

    if validation is None:
        best_meta_epoch = len(history) - 1
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    generator.fusion_weights, generator.score_weights = best_weights
    collapse = gaussian_collapse_loss(config)
    if history[best_meta_epoch]["loss_gaussian"] >= _LEARNT_BELOW * collapse:
        logger.info(
            "DFD: the Gaussian discriminator did not learn (mean loss %.3f at meta-epoch %d, collapse value %.1f); "
            "map weights %s, image-score weights %s (Perlin, Gaussian)",
            history[best_meta_epoch]["loss_gaussian"], best_meta_epoch, collapse, *best_weights,
        )
    if best_stats is None:
        # No validation split: freeze the stats on the normal training features (biased low:
        # the model has been fitted to them, so anomalies may exceed max; no clipping is done).
        every = train.normal_index  # one row per sample, as the stats always saw them
        _, _, best_stats = _maps_and_stats(
            model, train.normal_low[every], train.normal_high[every], generator, config, device, compute_dtype
        )
    return TrainResult(
        model=model,
        config=replace(config, fusion_weights=best_weights[0], score_weights=best_weights[1]),
        stats=best_stats,
        history=history,
        best_meta_epoch=best_meta_epoch,
        train_seconds=time.perf_counter() - start_time,
        image_size=train.image_size,
        map_generator=generator,
    )


# --------------------------------------------------------------------------------------------
# Persistence (safetensors + JSON, no pickle)
# --------------------------------------------------------------------------------------------


def save_dfd(
    path_dir: str | Path,
    model: DFDModel,
    config: DFDTrainConfig,
    stats: NormalizationStats,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``dfd.safetensors`` and ``dfd_config.json`` into ``path_dir``; returns the folder.

    ``extra`` (e.g. backbone name, image size) must be JSON-serialisable.
    """
    directory = Path(path_dir)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    metadata = {"format_version": str(FORMAT_VERSION)}
    save_file(state, str(directory / WEIGHTS_FILENAME), metadata=metadata)
    payload = {
        "format_version": FORMAT_VERSION,
        "dim": model.dim,
        "grid": list(model.grid),
        "config": config.to_dict(),
        "stats": stats.to_dict(),
        "extra": extra or {},
    }
    (directory / CONFIG_FILENAME).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return directory


def load_dfd(
    path_dir: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[DFDModel, DFDTrainConfig, NormalizationStats, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_dfd`: (model in eval mode, config, stats, extra)."""
    directory = Path(path_dir)
    payload = json.loads((directory / CONFIG_FILENAME).read_text(encoding="utf-8"))
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported DFD format version {version!r} (expected {FORMAT_VERSION})")
    config = DFDTrainConfig.from_dict(payload["config"])
    model = DFDModel(int(payload["dim"]), tuple(payload["grid"]), config.model_config())
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILENAME), device="cpu"), strict=True)
    model.to(device).eval()
    return model, config, NormalizationStats.from_dict(payload["stats"]), payload["extra"]
