"""DFD (Dual-path Frequency Discriminators) modules and losses.

Pure ``nn.Module`` definitions and loss functions; the training loop lives in
:mod:`fsad_pipeline.models.dfd_training`. Restated from the method digest
(``shared/reference/methods.md`` §6); no code was copied from the reference repository.

Sign convention: both discriminators output logits that are HIGH for NORMAL patches; the
anomaly score is the negated logit.

Feature tensors are channel-first ``(B, D, h, w)`` at the public interface. Internally the
modules work on channel-last tokens ``(B, L, D)`` with ``L = h·w`` in row-major order, which is
how the reference flattens the 32×32 patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsad_pipeline.models.backbones import batch_norm_affine
from fsad_pipeline.models.precision import autocast

# Architecture constants of the reference (not training hyperparameters).
LEAKY_RELU_SLOPE = 0.2  # LeakyReLU slope in both discriminators
VIT_LAYER_NORM_EPS = 1e-6  # timm ViT LayerNorm epsilon
VIT_INIT_STD = 0.02  # trunc-normal std of ViT linears and position embedding
CLS_TOKEN_INIT_STD = 1e-6  # normal std of the ViT cls token
TARGET_HEAD_DIM = 96  # paper: 16 heads at 1536-d


def default_num_heads(dim: int, target_head_dim: int = TARGET_HEAD_DIM) -> int:
    """Head count near ``dim // target_head_dim`` that divides ``dim`` (1536 → 16, 384 → 4)."""
    heads = max(1, dim // target_head_dim)
    while dim % heads:
        heads -= 1
    return heads


@dataclass
class DFDModelConfig:
    """Architecture hyperparameters of :class:`DFDModel`.

    Attributes:
        gaussian_hidden: hidden width of the Gaussian discriminator (reference: 1024).
        perlin_num_heads: attention heads of the Perlin ViT; ``None`` picks
            :func:`default_num_heads` (16 at 1536-d, as in the paper).
        perlin_mlp_ratio: ViT MLP expansion ratio (reference: 4.0).
        perlin_depth: number of ViT blocks (reference: 1).
    """

    gaussian_hidden: int = 1024
    perlin_num_heads: int | None = None
    perlin_mlp_ratio: float = 4.0
    perlin_depth: int = 1


def _to_tokens(features: Tensor) -> Tensor:
    """(B, D, h, w) → channel-last tokens (B, h·w, D) (a copy only if needed)."""
    batch, dim, height, width = features.shape
    return features.permute(0, 2, 3, 1).reshape(batch, height * width, dim)


class FeatureAdaptor(nn.Module):
    """Per-patch ``Linear(dim, dim)`` with bias and Xavier-normal weight (shared by both paths)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=True)
        nn.init.xavier_normal_(self.linear.weight)

    def forward(self, features: Tensor) -> Tensor:
        """Apply to ``(B, D, h, w)`` (channel-first, returned channel-first) or ``(..., D)``."""
        if features.dim() == 4:
            return self.linear(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.linear(features)


def linear_norm_act(block: nn.Sequential, tokens: Tensor) -> Tensor:
    """``Linear → BatchNorm1d → LeakyReLU`` of ``(N, D)`` tokens; in eval mode as one affine map.

    In eval mode the BatchNorm is an affine map per channel with its running statistics, so it
    folds into the Linear before it (``w·γ/√(σ²+ε)``, ``(b − μ)·γ/√(σ²+ε) + β``) and the activation
    runs in place: one matrix product and one pass over the (N, hidden) output instead of three
    passes, the same values to float rounding (1e-6 on logits of a few units). In training mode
    (batch statistics) the block runs as it is.
    """
    linear, norm, act = block
    if block.training or not isinstance(norm, nn.BatchNorm1d) or norm.running_var is None:
        return block(tokens)
    scale, shift = batch_norm_affine(norm)
    bias = shift if linear.bias is None else shift + linear.bias * scale
    return F.leaky_relu_(torch.addmm(bias, tokens, (linear.weight * scale[:, None]).t()), act.negative_slope)


class GaussianDiscriminator(nn.Module):
    """Linear → BatchNorm1d → LeakyReLU(0.2) → Linear(→1, no bias); (N, D) → (N,) logits."""

    def __init__(self, dim: int, hidden: int = 1024) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(LEAKY_RELU_SLOPE),
        )
        self.tail = nn.Linear(hidden, 1, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (HIGH = normal) for ``(N, D)`` tokens."""
        return self.tail(linear_norm_act(self.body, tokens)).squeeze(-1)


class _Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (qkv bias on)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, hd)
        out = F.scaled_dot_product_attention(query, key, value)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class _ViTBlock(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)); x + MLP(LN(x)). No dropout/LayerScale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=VIT_LAYER_NORM_EPS)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_LAYER_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PerlinDiscriminator(nn.Module):
    """Per-patch MLP followed by a single-block pre-norm ViT over the patch grid.

    ``(B, D, h, w)`` → ``(B, h, w)`` logits (HIGH = normal). The absolute position embedding is
    sized to ``grid``, so the discriminator only accepts that grid (as in the reference).
    """

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        *,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        depth: int = 1,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_heads = default_num_heads(dim) if num_heads is None else int(num_heads)
        # Per-patch embedding: PyTorch default init (reference leaves it untouched).
        self.embed = nn.Sequential(
            nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.LeakyReLU(LEAKY_RELU_SLOPE)
        )
        num_patches = self.grid[0] * self.grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, dim))
        self.blocks = nn.ModuleList(
            _ViTBlock(dim, self.num_heads, mlp_ratio) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=VIT_LAYER_NORM_EPS)
        self._init_vit()
        # The reference's final ``Linear(dim→1, bias=False)`` sits outside its timm ViT and
        # keeps PyTorch's default init, so it is created after the ViT init.
        self.tail = nn.Linear(dim, 1, bias=False)

    def _init_vit(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=VIT_INIT_STD)
        nn.init.normal_(self.cls_token, std=CLS_TOKEN_INIT_STD)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=VIT_INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, L)`` for channel-last tokens ``(B, L, D)`` with ``L = h·w``."""
        batch, length, dim = tokens.shape
        if length != self.grid[0] * self.grid[1]:
            raise ValueError(f"expected {self.grid[0]}×{self.grid[1]} patches, got {length}")
        x = linear_norm_act(self.embed, tokens.reshape(batch * length, dim)).reshape(batch, length, dim)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, 1:]  # drop the cls token
        return self.tail(x).squeeze(-1)

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``(B, h, w)`` for channel-first features ``(B, D, h, w)``."""
        batch, _, height, width = features.shape
        return self.forward_tokens(_to_tokens(features)).reshape(batch, height, width)


class DFDModel(nn.Module):
    """Shared feature adaptor + Gaussian and Perlin discriminators, used on both frequency paths."""

    def __init__(
        self, dim: int, grid: tuple[int, int], config: DFDModelConfig | None = None
    ) -> None:
        super().__init__()
        config = config or DFDModelConfig()
        self.dim = int(dim)
        self.grid = (int(grid[0]), int(grid[1]))
        self.config = config
        self.adaptor = FeatureAdaptor(self.dim)
        self.gaussian = GaussianDiscriminator(self.dim, hidden=config.gaussian_hidden)
        self.perlin = PerlinDiscriminator(
            self.dim,
            self.grid,
            num_heads=config.perlin_num_heads,
            mlp_ratio=config.perlin_mlp_ratio,
            depth=config.perlin_depth,
        )

    def path_logits(self, features: Tensor, compute_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(perlin_logits, gaussian_logits), each ``(B, h, w)`` float32, for one path's ``(B, D, h, w)``.

        ``compute_dtype`` (e.g. ``torch.bfloat16``) autocasts the adaptor and the Perlin
        discriminator, as training under that precision does (``dfd_training.path_losses``); the
        Gaussian discriminator always reads the float32 projection, as it was trained to (it
        tells features from copies moved by noise finer than bfloat16's step).
        """
        batch, dim, height, width = features.shape
        if dim != self.dim or (height, width) != self.grid:
            raise ValueError(
                f"expected (B, {self.dim}, {self.grid[0]}, {self.grid[1]}), got {tuple(features.shape)}"
            )
        with autocast(compute_dtype, features.device):
            projected = self.adaptor(_to_tokens(features))  # (B, L, D)
            perlin = self.perlin.forward_tokens(projected).float()
        with autocast(None, features.device):
            gaussian = self.gaussian(projected.float().reshape(-1, dim)).reshape(batch, -1)
        return perlin.reshape(batch, height, width), gaussian.reshape(batch, height, width)

    def forward(self, features_low: Tensor, features_high: Tensor) -> dict[str, Tensor]:
        """Per-path logits (HIGH = normal): perlin_low, perlin_high, gaussian_low, gaussian_high."""
        perlin_low, gaussian_low = self.path_logits(features_low)
        perlin_high, gaussian_high = self.path_logits(features_high)
        return {
            "perlin_low": perlin_low,
            "perlin_high": perlin_high,
            "gaussian_low": gaussian_low,
            "gaussian_high": gaussian_high,
        }

    def patch_scores(self, features: Tensor, compute_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """ANOMALY scores ``(perlin, gaussian)`` = −logits, each ``(B, h, w)`` (``compute_dtype``: :meth:`path_logits`)."""
        perlin, gaussian = self.path_logits(features, compute_dtype)
        return -perlin, -gaussian


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def gaussian_loss(d_normal: Tensor, d_noisy: Tensor, margin: float = 0.5) -> Tensor:
    """Truncated-L1 hinge: mean(relu(m − D(f))) + mean(relu(m + D(f+ε))).

    DFD hard-codes m = 0.5 (SimpleNet's CLI default of 0.8 is not used; digest §6 ⚠).
    """
    return F.relu(margin - d_normal).mean() + F.relu(margin + d_noisy).mean()


def _upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=False) ``(B, h, w)`` → ``(B, H, W)``."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(
        logits.unsqueeze(1), size=size, mode="bilinear", align_corners=False
    ).squeeze(1)


def perlin_pixel_loss(upsampled: Tensor, masks: Tensor, margin: float = 0.5) -> Tensor:
    """Pixel hinge on full-resolution logits ``(B, H, W)`` against binary masks ``(B, H, W)``.

    mean over anomalous pixels of relu(m + s) + mean over normal pixels of relu(m − s); only the
    normal term (over all pixels) when the batch has no anomalous pixel. Written with masked sums
    instead of boolean indexing (same value, no gather/scatter in the backward pass).
    """
    anomalous = (masks > 0.5).to(upsampled.dtype)
    num_anomalous = float(anomalous.sum())
    normal_hinge = F.relu(margin - upsampled)
    if num_anomalous == 0:
        return normal_hinge.mean()
    num_normal = anomalous.numel() - num_anomalous
    anomalous_term = (F.relu(margin + upsampled) * anomalous).sum() / num_anomalous
    if num_normal == 0:
        return anomalous_term
    return anomalous_term + (normal_hinge * (1.0 - anomalous)).sum() / num_normal


def perlin_image_loss(upsampled: Tensor, labels: Tensor) -> Tensor:
    """MSE between max-over-pixels sigmoid(−s) and the image labels ``(B,)``.

    sigmoid is monotone, so max sigmoid(−s) = sigmoid(−min s): one sigmoid per image.
    """
    image_prob = torch.sigmoid(-upsampled.flatten(1).amin(dim=1))
    return F.mse_loss(image_prob, labels.to(image_prob.dtype))


def perlin_loss(
    logits: Tensor,
    masks: Tensor,
    labels: Tensor,
    margin: float = 0.5,
    *,
    pixel_weight: float = 0.5,
    image_weight: float = 0.5,
) -> Tensor:
    """Perlin-path loss on patch logits ``(B, h, w)`` (HIGH = normal).

    Logits are upsampled bilinearly to the mask size ``(H, W)``; the total is
    ``pixel_weight · pixel + image_weight · image`` (reference: 0.5 / 0.5).
    """
    upsampled = _upsample(logits, tuple(masks.shape[-2:]))
    return pixel_weight * perlin_pixel_loss(upsampled, masks, margin) + image_weight * (
        perlin_image_loss(upsampled, labels)
    )


def pool_mask_to_grid(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """Max-pool full-resolution masks ``(B, H, W)`` to the patch grid → boolean ``(B, h, w)``.

    Equals ``max_pool2d`` with kernel ``H/h`` when divisible (the reference's case).
    """
    pooled = F.adaptive_max_pool2d(masks.unsqueeze(1).float(), output_size=grid).squeeze(1)
    return pooled > 0.5


def similarity_loss(proj_normal: Tensor, proj_aug: Tensor, masks: Tensor) -> Tensor:
    """Mean cosine similarity of normal vs augmented projected features over anomalous patches.

    Inputs ``(B, D, h, w)`` (channel-first, may be non-contiguous views) and masks ``(B, H, W)``.
    Minimising the raw cosine pushes anomalous-patch features away from their normal
    counterparts. Returns 0 when no patch is anomalous.
    """
    grid = (proj_normal.shape[-2], proj_normal.shape[-1])
    anomalous = pool_mask_to_grid(masks, grid)
    if not bool(anomalous.any()):
        return proj_normal.new_zeros(())
    cosine = F.cosine_similarity(proj_normal, proj_aug, dim=1)  # (B, h, w)
    return cosine[anomalous].mean()
