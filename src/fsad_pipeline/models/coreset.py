"""Greedy k-center coreset selection for memory banks (PatchCore / anomalib, methods.md §8).

Features are (optionally) projected with a seeded random Gaussian matrix to ``projection_dim``
dimensions (Johnson-Lindenstrauss), then points are added one at a time, each time the one with
the largest distance to its nearest already-selected point. The min-distance vector is updated
incrementally: one matrix-vector product over the (N × d) features per step, no N × N matrix.
The product reads the features stored column-major (a (d × N) copy): on this CPU torch's
matrix-vector kernel over that layout is 4.6× faster than over the row-major (N × d) one
(53k × 128 float32: 0.81 against 3.8 ms per step, one thread or two alike), and the step is
nothing but that product.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def coreset_size(num_points: int, ratio: float | None = None, n_select: int | None = None) -> int:
    """``n_select`` if given, else ``max(1, int(N·ratio))``; capped at ``N``."""
    if n_select is None:
        if ratio is None:
            raise ValueError("give either ratio or n_select")
        if ratio <= 0:
            raise ValueError(f"ratio must be positive, got {ratio}")
        n_select = max(1, int(num_points * ratio))
    if n_select < 1:
        raise ValueError(f"n_select must be >= 1, got {n_select}")
    return min(int(n_select), num_points)


def random_projection(
    features: Tensor, projection_dim: int | None = 128, *, seed: int = 0
) -> Tensor:
    """Seeded Gaussian random projection ``X·R`` with ``R ~ N(0, 1/d)``; identity when not smaller."""
    dim = features.shape[1]
    if projection_dim is None or projection_dim >= dim:
        return features
    generator = torch.Generator().manual_seed(int(seed))
    matrix = torch.randn(dim, projection_dim, generator=generator, dtype=torch.float32)
    matrix = (matrix / projection_dim**0.5).to(device=features.device, dtype=features.dtype)
    return features @ matrix


def kcenter_greedy(
    features: Tensor,
    ratio: float | None = None,
    *,
    n_select: int | None = None,
    projection_dim: int | None = 128,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
    num_threads: int | None = None,
) -> Tensor:
    """Indices (long, CPU) of a greedy k-center coreset of ``features`` (N, D).

    Args:
        features: (N, D) feature matrix.
        ratio: fraction of points to keep, ``n_select = max(1, int(N·ratio))``.
        n_select: explicit number of points (overrides ``ratio``).
        projection_dim: random-projection dimension for the distance computations
            (None = use the raw features).
        seed: seeds the projection and the random starting point.
        progress: show a tqdm progress bar.
        device: where the distance computations run.
        num_threads: torch CPU threads for the greedy loop (restored afterwards); None keeps the
            current setting. 1 is much faster when the cores are shared with other busy processes
            (each step is a short memory-bound kernel and OpenMP threads wait on each other).

    Returns:
        ``n_select`` distinct indices in selection order.
    """
    if features.dim() != 2:
        raise ValueError(f"expected (N, D) features, got shape {tuple(features.shape)}")
    num_points = features.shape[0]
    if num_points == 0:
        raise ValueError("cannot select a coreset from zero points")
    count = coreset_size(num_points, ratio, n_select)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        return _greedy(features, count, projection_dim, seed, progress, device)
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous_threads)


def _greedy(
    features: Tensor,
    count: int,
    projection_dim: int | None,
    seed: int,
    progress: bool,
    device: str | torch.device,
) -> Tensor:
    """The greedy farthest-point loop of :func:`kcenter_greedy`."""
    num_points = features.shape[0]
    work = features.detach().to(device=device, dtype=torch.float32)
    work = random_projection(work, projection_dim, seed=seed).contiguous()

    generator = torch.Generator().manual_seed(int(seed))
    start = int(torch.randint(num_points, (1,), generator=generator))
    selected = torch.empty(count, dtype=torch.long, device=work.device)
    selected[0] = start

    squared_norms = work.pow(2).sum(dim=1)
    # The (N × d) product as (d × N)ᵀ: the same values, read in the layout the fast kernel wants.
    by_column = work.t().contiguous().t()
    min_distances = torch.full((num_points,), float("inf"), device=work.device)
    buffer = torch.empty(num_points, device=work.device)
    current = torch.tensor(start, device=work.device)  # 0-d tensor: no host sync per step
    for step in tqdm(range(1, count), desc="k-center greedy", disable=not progress, leave=False):
        # ||x − c||² = ||x||² − 2·x·c + ||c||², one (N × d) matrix-vector product per step.
        torch.addmv(squared_norms, by_column, work[current], alpha=-2.0, out=buffer)
        buffer.add_(squared_norms[current])
        torch.minimum(min_distances, buffer, out=min_distances)
        min_distances[current] = -1.0  # never pick a selected point again (duplicates, rounding)
        current = torch.argmax(min_distances)
        selected[step] = current
    logger.debug("k-center greedy selected %d of %d points", count, num_points)
    return selected.cpu()
