"""Per-position Gaussian patch scorer (RegAD, coarse-to-fine seed; methods.md §9).

For every grid position ``i`` a multivariate Gaussian ``N(μ_i, Σ_i)`` is fitted over the
(augmented) support features; a test patch is scored by its Mahalanobis distance
``sqrt((x − μ_i)ᵀ Σ_i⁻¹ (x − μ_i))`` to the Gaussian of its own position.

Memory warning: the precision matrices take ``h·w·D²`` floats. D = 128 at 32×32 is 64 MB
(float32), but RegAD's D = 448 at 56×56 is ~2.5 GB (plus a float64 working copy of one
position chunk during ``fit``). Use ``max_dim`` (PaDiM-style random channel subset) for large D.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

WEIGHTS_FILENAME = "gaussian.safetensors"
CONFIG_FILENAME = "gaussian.json"
FORMAT_VERSION = 1


def _check_features(features: Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"expected features of shape (N, D, h, w), got {tuple(features.shape)}")


class PositionGaussianScorer:
    """Mahalanobis distance to a per-position Gaussian fitted on support patch features.

    Args:
        epsilon: Shrinkage added to the covariance diagonal (``Σ_i + ε·I``, RegAD uses 0.01).
            Makes the covariance invertible when N ≤ D.
        max_dim: If set and the feature dimension D exceeds it, a fixed random subset of
            ``max_dim`` channels (seeded, sorted) is used for fitting and scoring.
        seed: Seed of the channel subset.
        progress: Show a tqdm bar over position chunks during ``fit``.
        position_chunk: Number of positions whose covariances are estimated and inverted at
            once (bounds the float64 working memory to ``position_chunk·(N·D + 2·D²)`` doubles).
    """

    name = "gaussian"

    def __init__(
        self,
        *,
        epsilon: float = 0.01,
        max_dim: int | None = None,
        seed: int = 0,
        progress: bool = True,
        position_chunk: int = 256,
    ) -> None:
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if max_dim is not None and max_dim < 1:
            raise ValueError(f"max_dim must be >= 1 or None, got {max_dim}")
        if position_chunk < 1:
            raise ValueError(f"position_chunk must be >= 1, got {position_chunk}")
        self.epsilon = float(epsilon)
        self.max_dim = max_dim
        self.seed = int(seed)
        self.progress = progress
        self.position_chunk = int(position_chunk)
        self.mean: Tensor | None = None  # (h, w, d)
        self.precision: Tensor | None = None  # (h, w, d, d)
        self.channel_index: Tensor | None = None  # (d,) int64 indices into the D input channels
        self.in_dim: int | None = None
        self.num_samples: int | None = None

    # ------------------------------------------------------------------ fitting
    def _make_channel_index(self, in_dim: int) -> Tensor:
        """Sorted seeded random subset of channels, or all channels."""
        if self.max_dim is None or in_dim <= self.max_dim:
            return torch.arange(in_dim, dtype=torch.int64)
        generator = torch.Generator().manual_seed(self.seed)
        subset = torch.randperm(in_dim, generator=generator)[: self.max_dim]
        return torch.sort(subset).values

    def _select_channels(self, features: Tensor) -> Tensor:
        assert self.channel_index is not None and self.in_dim is not None
        if self.channel_index.numel() == self.in_dim:
            return features
        return features.index_select(1, self.channel_index.to(features.device))

    def fit(self, features: Tensor) -> PositionGaussianScorer:
        """Estimate μ_i, Σ_i (unbiased, + ε·I) and Σ_i⁻¹ at every position of ``(N, D, h, w)``.

        With N = 1 the unbiased denominator N − 1 is replaced by 1 (the covariance is then
        just ``ε·I``).
        """
        _check_features(features)
        num, in_dim, height, width = features.shape
        if num < 1:
            raise ValueError("need at least one support feature map")
        self.in_dim = int(in_dim)
        self.num_samples = int(num)
        self.channel_index = self._make_channel_index(in_dim)
        selected = self._select_channels(features.detach())
        dim = selected.shape[1]
        if dim < in_dim:
            logger.info("Gaussian: using %d of %d channels (seed %d)", dim, in_dim, self.seed)
        # (N, d, h, w) -> (h·w, N, d)
        positions = selected.permute(2, 3, 0, 1).reshape(height * width, num, dim)
        count = height * width
        means = torch.empty(count, dim, dtype=torch.float32)
        precisions = torch.empty(count, dim, dim, dtype=torch.float32)
        identity = torch.eye(dim, dtype=torch.float64)
        denominator = max(num - 1, 1)
        starts = range(0, count, self.position_chunk)
        for start in tqdm(starts, desc="Gaussian fit", unit="chunk", disable=not self.progress):
            stop = min(start + self.position_chunk, count)
            chunk = positions[start:stop].to(device="cpu", dtype=torch.float64)  # (c, N, d)
            mean = chunk.mean(dim=1)
            centred = chunk - mean.unsqueeze(1)
            covariance = centred.transpose(1, 2) @ centred / denominator + self.epsilon * identity
            cholesky, info = torch.linalg.cholesky_ex(covariance)
            if bool((info != 0).any()):
                raise ValueError(
                    "covariance is not positive definite at some positions; increase epsilon "
                    f"(currently {self.epsilon})"
                )
            means[start:stop] = mean.to(torch.float32)
            precisions[start:stop] = torch.cholesky_inverse(cholesky).to(torch.float32)
        self.mean = means.reshape(height, width, dim)
        self.precision = precisions.reshape(height, width, dim, dim)
        return self

    # ------------------------------------------------------------------ scoring
    def _require_fitted(self) -> tuple[Tensor, Tensor]:
        if self.mean is None or self.precision is None:
            raise RuntimeError("PositionGaussianScorer is not fitted; call fit() or load()")
        return self.mean, self.precision

    def patch_scores(self, features: Tensor) -> Tensor:
        """Mahalanobis distance per position: ``(N, D, h, w)`` → ``(N, h, w)`` float32."""
        mean, precision = self._require_fitted()
        _check_features(features)
        if features.shape[1] != self.in_dim:
            raise ValueError(f"expected {self.in_dim} channels, got {features.shape[1]}")
        if tuple(features.shape[2:]) != tuple(mean.shape[:2]):
            raise ValueError(
                f"expected grid {tuple(mean.shape[:2])}, got {tuple(features.shape[2:])}"
            )
        device = features.device
        selected = self._select_channels(features.detach()).to(torch.float32)
        diff = selected.permute(0, 2, 3, 1) - mean.to(device)  # (N, h, w, d)
        # Two contractions keep the intermediate at (N, h, w, d), never (N, h, w, d, d).
        weighted = torch.einsum("nhwd,hwde->nhwe", diff, precision.to(device))
        squared = (weighted * diff).sum(dim=-1)
        return squared.clamp_min(0.0).sqrt()

    def image_scores(self, features: Tensor, patch_scores: Tensor | None = None) -> Tensor:
        """Image score = max of the patch scores, ``(N,)``."""
        if patch_scores is None:
            patch_scores = self.patch_scores(features)
        return patch_scores.flatten(1).amax(dim=1)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``gaussian.safetensors`` (mean, precision, channel index) and ``gaussian.json``."""
        mean, precision = self._require_fitted()
        assert self.channel_index is not None
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "mean": mean.contiguous().cpu(),
                "precision": precision.contiguous().cpu(),
                "channel_index": self.channel_index.contiguous().cpu(),
            },
            str(path / WEIGHTS_FILENAME),
        )
        config = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "epsilon": self.epsilon,
            "max_dim": self.max_dim,
            "seed": self.seed,
            "position_chunk": self.position_chunk,
            "in_dim": self.in_dim,
            "num_samples": self.num_samples,
            "grid": list(mean.shape[:2]),
            "dim": int(mean.shape[2]),
        }
        (path / CONFIG_FILENAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path, *, progress: bool = True) -> PositionGaussianScorer:
        """Rebuild a fitted scorer from :meth:`save` output."""
        path = Path(directory)
        config = json.loads((path / CONFIG_FILENAME).read_text(encoding="utf-8"))
        scorer = cls(
            epsilon=config["epsilon"],
            max_dim=config["max_dim"],
            seed=config["seed"],
            progress=progress,
            position_chunk=config.get("position_chunk", 256),
        )
        tensors = load_file(str(path / WEIGHTS_FILENAME))
        scorer.mean = tensors["mean"]
        scorer.precision = tensors["precision"]
        scorer.channel_index = tensors["channel_index"]
        scorer.in_dim = int(config["in_dim"])
        scorer.num_samples = config.get("num_samples")
        return scorer
