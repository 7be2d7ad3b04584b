"""Frequency split and PatchCore-style patch features: the single place that computes features.

* :func:`laplacian_split` — DFD's single-level Laplacian split ``low = pyrUp(pyrDown(x))``,
  ``high = x - low`` (OpenCV semantics, batched in torch).
* :class:`PatchAggregator` — 3x3 neighbourhood aggregation, resize to the first layer's grid,
  per-layer and joint adaptive average pooling over the feature axis (methods.md §5).
* :class:`PatchFeatureExtractor` — backbone + aggregator, with a dual-path (low/high) forward.
* :func:`extract_features` — batched extraction from uint8 RGB arrays; what other modules call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fsad_pipeline.data.geometry import as_hw, check_size_multiple

from .backbones import FeatureBackbone, ViTPatchTokenMaps
from .precision import autocast, resolve_precision

logger = logging.getLogger(__name__)

# OpenCV's 5-tap binomial pyramid kernel, [1, 4, 6, 4, 1] / 16.
_PYRAMID_TAPS: tuple[float, ...] = (1.0, 4.0, 6.0, 4.0, 1.0)


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def select_device(preference: str | torch.device = "auto") -> torch.device:
    """Resolve a device preference; ``"auto"`` picks CUDA when available, else CPU."""
    if isinstance(preference, torch.device):
        return preference
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("CUDA requested but not available; using CPU")
        return torch.device("cpu")
    return device


# --------------------------------------------------------------------------------------------
# Laplacian frequency split
# --------------------------------------------------------------------------------------------


def _taps(x: Tensor) -> list[float]:
    total = sum(_PYRAMID_TAPS)
    return [tap / total for tap in _PYRAMID_TAPS]


def _down_last_axis(x: Tensor) -> Tensor:
    """Blur along the last axis (reflect-101 border) and keep even positions."""
    length = x.shape[-1]
    out_length = (length + 1) // 2
    # Reflect-101 padding by 2 (torch "reflect" semantics), built with slices so any rank works.
    padded = torch.cat([x[..., 2:3], x[..., 1:2], x, x[..., -2:-1], x[..., -3:-2]], dim=-1)
    taps = _taps(x)
    out = padded[..., 0 : 2 * out_length - 1 : 2] * taps[0]
    for offset in range(1, len(taps)):
        out = out + padded[..., offset : offset + 2 * out_length - 1 : 2] * taps[offset]
    return out


def _up_last_axis(x: Tensor, out_length: int) -> Tensor:
    """OpenCV pyrUp along the last axis, written in polyphase form (no zero insertion).

    Zero insertion followed by the reflect-101 blur of the upsampled signal equals, on the small
    signal ``s`` padded with ``s[-1] = s[1]`` and ``s[n] = s[n-1]``:
    ``even_i = (s[i-1] + 6 s[i] + s[i+1]) / 8`` and ``odd_i = (s[i] + s[i+1]) / 2``.
    """
    taps = _taps(x)  # 2 * taps per axis = [1, 4, 6, 4, 1] / 8
    padded = torch.cat([x[..., 1:2], x, x[..., -1:]], dim=-1)
    left, centre, right = padded[..., :-2], padded[..., 1:-1], padded[..., 2:]
    even = (left + right) * (2 * taps[0]) + centre * (2 * taps[2])
    odd = (centre + right) * (2 * taps[1])
    interleaved = torch.stack([even, odd], dim=-1).flatten(-2)
    return interleaved[..., :out_length]


def pyr_down(x: Tensor) -> Tensor:
    """OpenCV ``pyrDown`` for (..., H, W): 5x5 binomial blur (reflect-101), keep even rows/cols.

    Output size is ((H+1)//2, (W+1)//2).
    """
    rows_done = _down_last_axis(x)
    return _down_last_axis(rows_done.transpose(-1, -2)).transpose(-1, -2)


def pyr_up(x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """OpenCV ``pyrUp`` for (..., h, w) to ``size`` (default (2h, 2w)): zero insertion + blur x4.

    Odd target sizes are the top-left crop of the (2h, 2w) result, as in OpenCV.
    """
    height, width = x.shape[-2:]
    out_h, out_w = size if size is not None else (2 * height, 2 * width)
    if (out_h + 1) // 2 != height or (out_w + 1) // 2 != width:
        raise ValueError(f"pyr_up: size {(out_h, out_w)} incompatible with input {(height, width)}")
    if min(height, width) < 2:
        raise ValueError(f"pyr_up needs inputs of at least 2x2, got {height}x{width}")
    cols_done = _up_last_axis(x, out_w)
    return _up_last_axis(cols_done.transpose(-1, -2), out_h).transpose(-1, -2).contiguous()


def laplacian_split(x: Tensor) -> tuple[Tensor, Tensor]:
    """Split (B,C,H,W) float images into ``(low, high)`` with ``low + high == x``.

    ``low = pyrUp(pyrDown(x))`` exactly as OpenCV (reflect-101 borders, odd sizes upsampled back
    to the original size) and ``high = x - low``. Images must be at least 3x3.
    """
    if x.ndim != 4:
        raise ValueError(f"laplacian_split expects (B,C,H,W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError("laplacian_split expects a floating-point tensor")
    height, width = x.shape[-2:]
    if min(height, width) < 3:
        raise ValueError(f"laplacian_split needs images of at least 3x3, got {height}x{width}")
    low = pyr_up(pyr_down(x), size=(height, width))
    return low, x - low


# --------------------------------------------------------------------------------------------
# Adaptive average pooling over the feature axis
# --------------------------------------------------------------------------------------------


def adaptive_avg_pool_matrix(in_dim: int, out_dim: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Matrix ``M`` (in_dim, out_dim) with ``v @ M == F.adaptive_avg_pool1d(v, out_dim)``.

    Bin ``i`` averages inputs ``floor(i*in/out)`` to ``ceil((i+1)*in/out) - 1`` (PyTorch's rule).
    """
    matrix = torch.zeros(in_dim, out_dim, dtype=torch.float64)
    for i in range(out_dim):
        start = (i * in_dim) // out_dim
        end = -((-(i + 1) * in_dim) // out_dim)
        matrix[start:end, i] = 1.0 / (end - start)
    return matrix.to(dtype)


class _SparseChannelMap(nn.Module):
    """Apply a fixed sparse linear map over axis 1 as ``K`` weighted gathers.

    For a matrix ``M`` (in, out) whose columns have at most ``K`` non-zeros this computes
    ``einsum('bi...,io->bo...', x, M)`` with ``K`` index_selects instead of a dense matmul,
    which is memory-bound and several times cheaper for averaging matrices.
    """

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        nonzero = matrix != 0
        max_terms = max(int(nonzero.sum(0).max()), 1)
        out_dim = matrix.shape[1]
        indices = torch.zeros(max_terms, out_dim, dtype=torch.long)
        weights = torch.zeros(max_terms, out_dim, dtype=torch.float32)
        for column in range(out_dim):
            rows = torch.nonzero(nonzero[:, column]).flatten()
            indices[: len(rows), column] = rows
            weights[: len(rows), column] = matrix[rows, column].float()
        self.register_buffer("indices", indices, persistent=False)
        self.register_buffer("weights", weights, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        out: Tensor | None = None
        for term in range(self.indices.shape[0]):
            weight = self.weights[term].to(x.dtype).view(shape)
            contribution = x.index_select(1, self.indices[term]) * weight
            out = contribution if out is None else out.add_(contribution)
        assert out is not None
        return out


def _linear_resize_matrix(in_size: int, out_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(in_size, out_size) matrix of 1-D linear interpolation with ``align_corners=False``."""
    eye = torch.eye(in_size, dtype=dtype, device=device)[:, None, :]
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[:, 0, :]


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` as two small matmuls.

    Bilinear interpolation is separable, and on CPU the two matmuls are several times faster
    than ``F.interpolate`` for the many-channel maps used here.
    """
    batch, channels, height, width = x.shape
    out_h, out_w = size
    along_w = _linear_resize_matrix(width, out_w, x.dtype, x.device)
    along_h = _linear_resize_matrix(height, out_h, x.dtype, x.device)
    resized = (x.reshape(-1, width) @ along_w).reshape(batch * channels, height, out_w)
    resized = torch.matmul(along_h.t(), resized)
    return resized.reshape(batch, channels, out_h, out_w)


# --------------------------------------------------------------------------------------------
# Patch aggregation
# --------------------------------------------------------------------------------------------


class PatchAggregator(nn.Module):
    """PatchCore / SimpleNet / DFD patch aggregation with no learnable parameters.

    Per layer: ``patch_size`` x ``patch_size`` neighbourhood unfold (stride 1, zero padding so the
    grid is unchanged), deeper layers bilinearly resized to the FIRST layer's grid
    (``align_corners=False``), adaptive average pooling of each flattened (C, k, k) vector to
    ``pretrain_dim``; the per-layer vectors are concatenated and pooled to ``target_dim``.

    All steps after the unfold are linear maps over the feature axis or over space, so they are
    folded: one sparse (C*k*k -> target) map per layer at the layer's own resolution, then the
    resize of the (smaller) result. Mathematically identical to the reference order.

    Args:
        channels: Channels of each input layer (e.g. ``backbone.channels``).
        patch_size: Neighbourhood size (3 as in DFD).
        pretrain_dim: Per-layer pooled dimension (DFD: 1536).
        target_dim: Output dimension (DFD: 1536).
    """

    def __init__(
        self,
        channels: Sequence[int],
        *,
        patch_size: int = 3,
        pretrain_dim: int = 1536,
        target_dim: int = 1536,
    ) -> None:
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd integer, got {patch_size}")
        self.channels = [int(c) for c in channels]
        self.patch_size = int(patch_size)
        self.pretrain_dim = int(pretrain_dim)
        self.target_dim = int(target_dim)
        num_layers = len(self.channels)
        joint = adaptive_avg_pool_matrix(num_layers * self.pretrain_dim, self.target_dim, dtype=torch.float64)
        self.maps = nn.ModuleList()
        self.output_ranges: list[tuple[int, int]] = []
        for layer, layer_channels in enumerate(self.channels):
            per_layer = adaptive_avg_pool_matrix(
                layer_channels * self.patch_size**2, self.pretrain_dim, dtype=torch.float64
            )
            block = joint[layer * self.pretrain_dim : (layer + 1) * self.pretrain_dim]
            composite = per_layer @ block  # (C*k*k, target_dim)
            used = torch.nonzero(composite.abs().sum(0) > 0).flatten()
            first, last = int(used.min()), int(used.max()) + 1
            self.output_ranges.append((first, last))
            self.maps.append(_SparseChannelMap(composite[:, first:last]))
        # Usual case (e.g. 2 x 1536 -> 1536): layers fill disjoint, adjacent output ranges.
        ordered = sorted(self.output_ranges)
        self._disjoint = ordered[0][0] == 0 and ordered[-1][1] == self.target_dim and all(
            previous[1] == current[0] for previous, current in zip(ordered, ordered[1:])
        )

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Aggregate a list of (B, C_l, h_l, w_l) maps into (B, target_dim, h_0, w_0)."""
        if len(features) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} feature maps, got {len(features)}")
        batch = features[0].shape[0]
        grid = (int(features[0].shape[-2]), int(features[0].shape[-1]))
        pad = self.patch_size // 2
        pieces: list[tuple[int, int, Tensor]] = []
        for feature, channel_map, (first, last) in zip(features, self.maps, self.output_ranges, strict=True):
            height, width = feature.shape[-2:]
            # (B, C*k*k, h*w): element c*k*k + (dy*k + dx), the same order as PatchCore's reshape.
            patches = F.unfold(feature, kernel_size=self.patch_size, padding=pad, stride=1)
            pooled = channel_map(patches).reshape(batch, last - first, height, width)
            if (height, width) != grid:
                pooled = resize_bilinear(pooled, grid)
            pieces.append((first, last, pooled))
        if self._disjoint:
            return torch.cat([piece for _, _, piece in sorted(pieces, key=lambda item: item[0])], dim=1)
        out = features[0].new_zeros(batch, self.target_dim, *grid)
        for first, last, piece in pieces:
            out[:, first:last] += piece
        return out


# --------------------------------------------------------------------------------------------
# Extractor
# --------------------------------------------------------------------------------------------


class PatchFeatureExtractor(nn.Module):
    """Frozen backbone + :class:`PatchAggregator`; inputs are RGB float batches in [0, 1].

    Args:
        backbone: A :class:`FeatureBackbone` (see ``build_backbone``). The extractor owns it from
            then on: its BatchNorms are folded into the convolutions (inference only).
        patch_size: Neighbourhood size of the aggregator.
        pretrain_dim: Per-layer pooled dimension.
        target_dim: Output feature dimension.
        precision: ``fp32``, ``bf16`` or ``auto`` (:mod:`fsad_pipeline.models.precision`): the
            backbone and the aggregator run under bfloat16 autocast where it resolves to
            bfloat16 on the input's device (``auto``: where the chip computes it natively); the
            features come out as float32 either way.
    """

    def __init__(
        self,
        backbone: FeatureBackbone,
        *,
        patch_size: int = 3,
        pretrain_dim: int = 1536,
        target_dim: int = 1536,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        resolve_precision(precision, "cpu")  # an unknown setting fails here, not at the first batch
        self.precision = precision
        self.backbone = backbone
        # Frozen for good here: BatchNorm folded into the convolutions (1.5x faster Lite0 on CPU).
        backbone.fold_batch_norms()
        self.aggregator = PatchAggregator(
            backbone.channels, patch_size=patch_size, pretrain_dim=pretrain_dim, target_dim=target_dim
        )
        self._grid_cache: dict[tuple[int, int], tuple[int, int]] = {}
        super().train(False)

    def train(self, mode: bool = True) -> PatchFeatureExtractor:
        """The extractor has no trainable state: always stay in eval mode."""
        return super().train(False)

    @property
    def feature_dim(self) -> int:
        """Dimension D of each patch feature."""
        return self.aggregator.target_dim

    @property
    def size_multiple(self) -> int:
        """What input sides must be multiples of: the deepest used stage's stride (CNNs).

        A ViT resizes every input to its own resolution inside, so any size works (1).
        """
        if isinstance(self.backbone.model, ViTPatchTokenMaps):
            return 1
        return max(self.backbone.strides, default=1)

    def grid_size(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """Feature grid (h, w) for square ``image_size`` or (H, W) inputs (exact, cached).

        Raises ValueError when a side is not a multiple of :attr:`size_multiple`.
        """
        size = as_hw(image_size)
        if size not in self._grid_cache:
            check_size_multiple(size, self.size_multiple, what=f"of {self.backbone.name}")
            parameter = next(self.backbone.parameters())
            probe = torch.zeros(1, 3, *size, dtype=parameter.dtype, device=parameter.device)
            with torch.inference_mode():
                first = self.backbone(probe)[0]
            self._grid_cache[size] = (int(first.shape[-2]), int(first.shape[-1]))
        return self._grid_cache[size]

    def _features(self, images01: Tensor) -> Tensor:
        dtype = resolve_precision(self.precision, images01.device)
        with autocast(dtype, images01.device):  # None: float32 even inside a caller's autocast
            features = self.aggregator(self.backbone(self.backbone.normalize(images01)))
        return features.float()

    def forward(self, images01: Tensor) -> Tensor:
        """Patch features (B, D, h, w) of RGB images (B, 3, H, W) in [0, 1]."""
        return self._features(images01)

    def dual_path(self, images01: Tensor) -> tuple[Tensor, Tensor]:
        """DFD features ``(low, high)`` of the Laplacian split, in one backbone pass.

        The split is done before normalisation (as in DFD) and both paths are normalised with
        the backbone's mean/std.
        """
        low, high = laplacian_split(images01)
        features = self._features(torch.cat([low, high], dim=0))
        return features[: images01.shape[0]], features[images01.shape[0] :]


def extract_features(
    extractor: PatchFeatureExtractor,
    images: np.ndarray,
    *,
    image_size: int | Sequence[int] = 256,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    dual_path: bool = True,
    progress: bool = True,
    desc: str = "features",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor] | Tensor:
    """Patch features of uint8 RGB images (N, H, W, 3), returned on CPU.

    Images are resized to ``image_size`` (bilinear, antialiased) in torch and processed in
    batches under ``torch.inference_mode()``.

    Returns:
        ``(low, high)`` tensors (N, D, h, w) when ``dual_path``, else one (N, D, h, w) tensor,
        stored as ``dtype``.
    """
    if images.ndim == 3:  # grey (N, H, W) -> RGB
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) uint8 RGB, got shape {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    target_device = select_device(device)
    extractor = extractor.to(target_device)
    size = as_hw(image_size)
    grid = extractor.grid_size(size)
    count = images.shape[0]
    num_paths = 2 if dual_path else 1
    outputs = [torch.empty(count, extractor.feature_dim, *grid, dtype=dtype) for _ in range(num_paths)]
    compute_dtype = next(extractor.backbone.parameters()).dtype
    scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0

    with torch.inference_mode():
        for start in tqdm(range(0, count, batch_size), desc=desc, disable=not progress, unit="batch"):
            stop = min(start + batch_size, count)
            batch = torch.from_numpy(np.ascontiguousarray(images[start:stop]))
            batch = batch.to(target_device).permute(0, 3, 1, 2).to(compute_dtype) * scale
            if tuple(batch.shape[-2:]) != size:
                batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
            results = extractor.dual_path(batch) if dual_path else (extractor(batch),)
            for output, result in zip(outputs, results, strict=True):
                output[start:stop] = result.to(device="cpu", dtype=dtype)
    return (outputs[0], outputs[1]) if dual_path else outputs[0]


__all__: list[str] = [
    "PatchAggregator",
    "PatchFeatureExtractor",
    "adaptive_avg_pool_matrix",
    "extract_features",
    "laplacian_split",
    "pyr_down",
    "pyr_up",
    "resize_bilinear",
    "select_device",
]
