"""Feature registration (RegAD, methods.md §9): spatial transformers inside a backbone + Siamese heads.

A :class:`RegistrationEncoder` is a backbone of the project's factory cut into its feature
stages, with a spatial transformer (STN) after each of the first stages. Each STN predicts a
per-image transform (rotation + scale, or a full affine) and warps the stage's feature map
(``grid_sample`` with reflection padding, never zero/black borders); the next stage runs on the
warped ("registered") map. For scoring, every returned stage is warped back by the inverse of
the transforms accumulated so far, so features stay aligned with the input pixels and the
anomaly maps land where the defect is.

Training (``models/base_training.py``) uses the registered maps of the deepest returned stage:
projection + prediction heads (:class:`SiameseHead`) and SimSiam's symmetric negative cosine
with stop-gradient (:func:`siamese_loss`) on two images of the same category.

The STN's last layer starts at zero weights with the identity as its bias, and the optional
channel attention (multi-scale channel attention + squeeze-and-excitation, the coarse-to-fine
seed) starts as the identity too, so an untrained encoder computes exactly the plain backbone's
features: training can only move away from the ImageNet features, and checkpoint selection can
fall back to them.

A trained encoder is saved as ``encoder.safetensors`` + ``encoder.json`` and loaded as a plain
:class:`~fsad_pipeline.models.backbones.FeatureBackbone` (frozen, eval mode), so the patch
feature extractor and every memory-bank scorer use it like any other backbone:
``build_backbone("registered:<name>")`` (see :func:`resolve_encoder_dir`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backbones
from .backbones import FeatureBackbone, build_backbone, get_backbone_spec

logger = logging.getLogger(__name__)

#: ``build_backbone("registered:<name or folder>")`` loads a registered encoder.
REGISTERED_PREFIX = "registered:"
#: Where ``registered:<name>`` looks, relative to the working directory (the Kedro project root).
DEFAULT_REGISTRY = Path("data") / "06_models" / "encoders"
#: Environment variable that overrides :data:`DEFAULT_REGISTRY`.
REGISTRY_ENV = "FSAD_ENCODER_REGISTRY"
ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_CONFIG = "encoder.json"
FORMAT_VERSION = 1
STN_MODES = ("rotation_scale", "affine")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class STNConfig:
    """Spatial transformers of the encoder.

    Attributes:
        mode: ``rotation_scale`` (RegAD: angle, sx, sy) or ``affine`` (6 free parameters).
        stages: feature-stage indices (timm ``out_indices`` numbering) followed by an STN;
            RegAD puts one after each of ResNet's layer1-3, i.e. stages 1, 2, 3.
        loc_channels: channels of the two conv-BN-ReLU-maxpool blocks of the localisation net
            (RegAD: 64, 16).
        loc_pool: the localisation map is average-pooled to ``loc_pool`` x ``loc_pool`` before
            the fully connected layers, so one encoder serves any input size (RegAD flattens a
            size-dependent map).
        fc_hidden: hidden width of the localisation head (RegAD: 1024).
    """

    mode: str = "rotation_scale"
    stages: tuple[int, ...] = (1, 2, 3)
    loc_channels: tuple[int, int] = (64, 16)
    loc_pool: int = 4
    fc_hidden: int = 128

    def __post_init__(self) -> None:
        if self.mode not in STN_MODES:
            raise ValueError(f"unknown STN mode {self.mode!r}; choose one of {STN_MODES}")
        self.stages = tuple(sorted(int(s) for s in self.stages))
        self.loc_channels = tuple(int(c) for c in self.loc_channels)  # type: ignore[assignment]
        if len(self.loc_channels) != 2:
            raise ValueError(f"loc_channels needs two values, got {self.loc_channels}")
        if not self.stages:
            raise ValueError("an STN encoder needs at least one STN stage")


@dataclass
class EncoderConfig:
    """Architecture of a :class:`RegistrationEncoder` (everything needed to rebuild it).

    Attributes:
        base: backbone name of the factory (``models/backbones.py``).
        out_indices: stages returned for scoring; ``None`` = the base backbone's default.
        stn: the spatial transformers.
        attention: multi-scale channel attention + SE on every returned stage (coarse-to-fine seed).
        attention_reduction: channel reduction of the attention branches.
    """

    base: str = backbones.DEFAULT_BACKBONE
    out_indices: tuple[int, ...] | None = None
    stn: STNConfig = field(default_factory=STNConfig)
    attention: bool = False
    attention_reduction: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.stn, dict):
            self.stn = STNConfig(**self.stn)
        if self.out_indices is None:
            self.out_indices = tuple(get_backbone_spec(self.base).out_indices)
        self.out_indices = tuple(sorted(int(i) for i in self.out_indices))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        known = {item.name for item in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown encoder options: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["out_indices"] = list(self.out_indices or ())
        payload["stn"] = {k: list(v) if isinstance(v, tuple) else v for k, v in payload["stn"].items()}
        return payload


# --------------------------------------------------------------------------------------------
# Warps
# --------------------------------------------------------------------------------------------


def _to_3x3(theta: Tensor) -> Tensor:
    bottom = theta.new_tensor([0.0, 0.0, 1.0]).expand(theta.shape[0], 1, 3)
    return torch.cat([theta, bottom], dim=1)


def identity_theta(batch: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
    """(B, 2, 3) identity transforms."""
    return torch.eye(2, 3, dtype=dtype, device=device).expand(batch, 2, 3).clone()


def compose(first: Tensor, second: Tensor) -> Tensor:
    """The (B, 2, 3) transform of warping by ``first`` and then by ``second``.

    ``warp(x, θ)(p) = x(θ p)`` (affine_grid semantics), so warping by ``first`` then ``second``
    reads ``x(first · second · p)``: the matrix product in that order.
    """
    return (_to_3x3(first) @ _to_3x3(second))[:, :2]


def invert(theta: Tensor) -> Tensor:
    """(B, 2, 3) inverse transforms: ``warp(warp(x, θ), invert(θ)) ≈ x`` away from the borders."""
    return torch.linalg.inv(_to_3x3(theta))[:, :2]


def warp(features: Tensor, theta: Tensor) -> Tensor:
    """Warp (B, C, H, W) maps by (B, 2, 3) transforms: bilinear, reflection padding."""
    grid = F.affine_grid(theta.to(features.dtype), list(features.shape), align_corners=False)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def rotation_scale_theta(params: Tensor) -> Tensor:
    """RegAD's ``rotation_scale`` transform from (B, 3) = (angle, sx, sy).

    ``[[cos·sx, −sin, 0], [sin, cos·sy, 0]]`` exactly as the reference (the sine is not scaled).
    """
    angle, scale_x, scale_y = params.unbind(dim=1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    rows = [torch.stack([cos * scale_x, -sin, zero], dim=1), torch.stack([sin, cos * scale_y, zero], dim=1)]
    return torch.stack(rows, dim=1)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class SpatialTransformer(nn.Module):
    """Localisation net + warp; identity at initialisation (zero last weights, identity bias)."""

    def __init__(self, channels: int, config: STNConfig) -> None:
        super().__init__()
        self.mode = config.mode
        mid, low = config.loc_channels
        self.localisation = nn.Sequential(
            nn.Conv2d(channels, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(mid, low, 3, padding=1, bias=False),
            nn.BatchNorm2d(low),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            nn.AdaptiveAvgPool2d(config.loc_pool),
            nn.Flatten(),
            nn.Linear(low * config.loc_pool**2, config.fc_hidden),
            nn.ReLU(inplace=True),
        )
        identity = [0.0, 1.0, 1.0] if self.mode == "rotation_scale" else [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        self.head = nn.Linear(config.fc_hidden, len(identity))
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor(identity))

    def theta(self, features: Tensor) -> Tensor:
        """(B, 2, 3) transform predicted for each map."""
        params = self.head(self.localisation(features))
        if self.mode == "rotation_scale":
            return rotation_scale_theta(params)
        return params.view(-1, 2, 3)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """The warped maps and the transforms used."""
        theta = self.theta(features)
        return warp(features, theta), theta


class ChannelAttention(nn.Module):
    """Multi-scale channel attention (local point-wise + global SE branch), identity at init.

    ``x · 2·sigmoid(local(x) + global(x))``: the last layer of each branch starts at zero, so
    the factor starts at exactly 1 and training decides how much to re-weight channels.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // max(int(reduction), 1), 4)
        self.local = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        self.squeeze = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
        )
        for branch in (self.local, self.squeeze):
            nn.init.zeros_(branch[-1].weight)
            nn.init.zeros_(branch[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x * (2.0 * torch.sigmoid(self.local(x) + self.squeeze(x)))


class SiameseHead(nn.Module):
    """RegAD's projection (3 point-wise convs) and prediction (2 point-wise convs) heads."""

    def __init__(self, channels: int, dim: int = 256, hidden: int = 128) -> None:
        super().__init__()
        self.projector = nn.Sequential(
            nn.Conv2d(channels, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 1),
        )
        self.predictor = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim, 1),
        )

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(projection z, prediction p) maps."""
        z = self.projector(features)
        return z, self.predictor(z)


def negative_cosine(prediction: Tensor, target: Tensor) -> Tensor:
    """−cos over channels, averaged over positions and batch; the target is not differentiated."""
    return -F.cosine_similarity(prediction, target.detach(), dim=1).mean()


def siamese_loss(p1: Tensor, z1: Tensor, p2: Tensor, z2: Tensor) -> Tensor:
    """SimSiam: ½·(−cos(p1, sg(z2))) + ½·(−cos(p2, sg(z1))); in [−1, 1], −1 when aligned."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


def split_stages(model: nn.Module) -> list[nn.Module]:
    """Cut a timm ``features_only`` model into one module per feature stage, in order.

    Stage ``i`` maps the output of stage ``i − 1`` (the image for ``i = 0``) to feature ``i``.
    Supports EfficientNet-style models (stem + ``blocks``) and timm ``FeatureListNet`` (ResNets).
    """
    boundaries = list(model.feature_info.module_name())
    if hasattr(model, "conv_stem") and isinstance(getattr(model, "blocks", None), nn.Sequential):
        stem = [model.conv_stem, model.bn1]
        blocks = list(model.blocks)
        stages: list[nn.Module] = []
        pending: list[nn.Module] = list(stem)
        next_block = 0
        for name in boundaries:
            parts = name.split(".")
            if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
                last = int(parts[1])
                pending += blocks[next_block : last + 1]
                next_block = last + 1
            elif name not in ("bn1", "conv_stem", "act1"):
                raise NotImplementedError(f"cannot split stage {name!r} of {type(model).__name__}")
            stages.append(nn.Sequential(*pending))
            pending = []
        return stages
    if isinstance(model, nn.ModuleDict):
        stages, pending = [], []
        remaining = list(boundaries)
        for name, module in model.items():
            pending.append(module)
            if remaining and name == remaining[0].replace(".", "_"):
                stages.append(nn.Sequential(*pending))
                pending = []
                remaining.pop(0)
            if not remaining:
                break
        if remaining:
            raise NotImplementedError(f"feature modules {remaining} not found in {type(model).__name__}")
        return stages
    raise NotImplementedError(f"STN insertion does not support {type(model).__name__} backbones")


class RegistrationEncoder(nn.Module):
    """Backbone stages with STNs after the first ones; returns inverse-warped stage features.

    Only stages up to the deepest of ``out_indices`` are kept. Stages up to and including the
    first STN stage (:attr:`prefix_stages`) never change in training, so their output can be
    cached (:meth:`prefix`, :meth:`from_prefix`).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        channels: Sequence[int],
        strides: Sequence[int],
        config: EncoderConfig,
    ) -> None:
        super().__init__()
        self.config = config
        out_indices = tuple(config.out_indices or ())
        deepest = max(max(out_indices), max(config.stn.stages))
        if min(out_indices) < min(config.stn.stages):
            raise ValueError(f"returned stages {out_indices} must not come before the first STN stage {config.stn.stages}")
        if deepest >= len(stages):
            raise ValueError(f"{config.base} has {len(stages)} feature stages; asked for stage {deepest}")
        self.stages = nn.ModuleList(stages[: deepest + 1])
        self.all_channels = [int(c) for c in channels]
        self.out_indices = out_indices
        self.stn_stages = tuple(config.stn.stages)
        self.stns = nn.ModuleDict({str(i): SpatialTransformer(self.all_channels[i], config.stn) for i in self.stn_stages})
        self.attention = nn.ModuleDict(
            {str(i): ChannelAttention(self.all_channels[i], config.attention_reduction) for i in out_indices}
            if config.attention
            else {}
        )
        self.channels = [self.all_channels[i] for i in out_indices]
        self.strides = [int(strides[i]) for i in out_indices]
        self.prefix_stages = self.stn_stages[0] + 1

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the backbone stages after the cacheable prefix."""
        for stage in self.stages[self.prefix_stages :]:
            yield from stage.parameters()

    def registration_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the STNs and the channel attention."""
        yield from self.stns.parameters()
        yield from self.attention.parameters()

    def prefix(self, x: Tensor) -> Tensor:
        """Output of the frozen stages before the first STN (cacheable)."""
        for stage in self.stages[: self.prefix_stages]:
            x = stage(x)
        return x

    def from_prefix(self, h: Tensor, *, warp_back: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """(inverse-warped features for scoring, registered features) of each returned stage.

        ``warp_back=False`` skips the inverse warps (training only needs the registered maps)
        and returns an empty first list.
        """
        accumulated: Tensor | None = None
        scored: list[Tensor] = []
        registered: list[Tensor] = []
        for index in range(self.prefix_stages - 1, len(self.stages)):
            if index >= self.prefix_stages:
                h = self.stages[index](h)
            key = str(index)
            if key in self.stns:
                h, theta = self.stns[key](h)
                accumulated = theta if accumulated is None else compose(accumulated, theta)
            if index in self.out_indices:
                out = self.attention[key](h) if key in self.attention else h
                registered.append(out)
                if warp_back:
                    scored.append(out if accumulated is None else warp(out, invert(accumulated)))
        return scored, registered

    def forward(self, x: Tensor) -> list[Tensor]:
        """Features of the returned stages, warped back into the input's coordinates."""
        return self.from_prefix(self.prefix(x))[0]


@contextmanager
def _quiet_backbone_logs() -> Iterator[None]:
    """Building an architecture to load weights into warns about random weights; mute that."""
    target = logging.getLogger(backbones.__name__)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def build_registration_encoder(
    config: EncoderConfig,
    *,
    pretrained: bool = True,
    weights_path: str | os.PathLike[str] | None = None,
) -> tuple[RegistrationEncoder, FeatureBackbone]:
    """A trainable encoder on the base backbone (ImageNet weights when ``pretrained``).

    Returns the encoder and the factory's :class:`FeatureBackbone` it was cut from (for its
    normalisation constants).
    """
    deepest = max(max(config.out_indices or ()), max(config.stn.stages))
    with _quiet_backbone_logs() if not pretrained else nullcontext():
        base = build_backbone(
            config.base, pretrained=pretrained, weights_path=weights_path, out_indices=tuple(range(deepest + 1))
        )
    stages = split_stages(base.model)
    encoder = RegistrationEncoder(stages, base.channels, base.strides, config)
    for parameter in encoder.parameters():
        parameter.requires_grad_(True)
    return encoder, base


# --------------------------------------------------------------------------------------------
# Registry: save, resolve, load
# --------------------------------------------------------------------------------------------


def registry_root() -> Path:
    """Folder that ``registered:<name>`` resolves names in (``$FSAD_ENCODER_REGISTRY`` or the default)."""
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


def resolve_encoder_dir(reference: str) -> Path:
    """The folder of a registered encoder: ``<registry>/<name>``, or a folder path given directly."""
    name = reference[len(REGISTERED_PREFIX) :] if reference.startswith(REGISTERED_PREFIX) else reference
    if not name:
        raise ValueError("registered encoder reference is empty; use registered:<name>")
    candidates = [Path(name)] if (os.sep in name or Path(name).is_absolute()) else [registry_root() / name]
    for candidate in candidates:
        if (candidate / ENCODER_CONFIG).is_file():
            return candidate
    root = registry_root()
    known = sorted(p.name for p in root.iterdir() if (p / ENCODER_CONFIG).is_file()) if root.is_dir() else []
    raise FileNotFoundError(
        f"no registered encoder {name!r} (looked for {candidates[0] / ENCODER_CONFIG}); registered in "
        f"{root.resolve()}: {', '.join(known) or 'none'}. Train one with kedro run --pipelines=base_training."
    )


def save_encoder(
    directory: str | Path,
    encoder: RegistrationEncoder,
    *,
    name: str,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``encoder.safetensors`` (encoder weights, no training heads) + ``encoder.json``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(directory / ENCODER_WEIGHTS))
    payload = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "base_backbone": encoder.config.base,
        "encoder": encoder.config.to_dict(),
        "channels": encoder.channels,
        "strides": encoder.strides,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "image_size": int(image_size),
        "training": training or {},
    }
    (directory / ENCODER_CONFIG).write_text(json.dumps(payload, indent=2))
    return directory


def read_encoder_info(reference: str | Path) -> dict[str, Any]:
    """The ``encoder.json`` of a registered encoder (name or folder)."""
    directory = Path(reference) if isinstance(reference, Path) else resolve_encoder_dir(reference)
    return json.loads((directory / ENCODER_CONFIG).read_text())


def load_registered_encoder(reference: str, *, out_indices: Sequence[int] | None = None) -> FeatureBackbone:
    """A registered encoder as a frozen :class:`FeatureBackbone` named ``registered:<name>``."""
    from safetensors.torch import load_file

    directory = resolve_encoder_dir(reference)
    info = json.loads((directory / ENCODER_CONFIG).read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: encoder format {info.get('format_version')} != {FORMAT_VERSION}")
    config = EncoderConfig.from_dict(info["encoder"])
    if out_indices is not None and tuple(sorted(out_indices)) != tuple(config.out_indices or ()):
        raise ValueError(f"registered encoder {info['name']!r} returns stages {config.out_indices}, not {out_indices}")
    encoder, _ = build_registration_encoder(config, pretrained=False)
    encoder.load_state_dict(load_file(str(directory / ENCODER_WEIGHTS), device="cpu"), strict=True)
    name = reference if reference.startswith(REGISTERED_PREFIX) else f"{REGISTERED_PREFIX}{reference}"
    backbone = FeatureBackbone(
        encoder, name=name, channels=encoder.channels, strides=encoder.strides, mean=info["mean"], std=info["std"]
    )
    logger.info("Registered encoder %s (%s, base %s) from %s", info["name"], name, config.base, directory)
    return backbone


__all__: list[str] = [
    "ChannelAttention",
    "EncoderConfig",
    "REGISTERED_PREFIX",
    "RegistrationEncoder",
    "STNConfig",
    "SiameseHead",
    "SpatialTransformer",
    "build_registration_encoder",
    "compose",
    "identity_theta",
    "invert",
    "load_registered_encoder",
    "read_encoder_info",
    "registry_root",
    "resolve_encoder_dir",
    "rotation_scale_theta",
    "save_encoder",
    "siamese_loss",
    "split_stages",
    "warp",
]
