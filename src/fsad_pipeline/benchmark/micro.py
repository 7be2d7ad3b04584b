"""Micro-benchmarks of the memory bank's building blocks: k-center greedy coreset and kNN search."""

from __future__ import annotations

import time


def micro_benchmarks(*, bank_size: int = 100_000, dim: int = 152, queries: int = 10_000, seed: int = 0) -> dict:
    """Coreset seconds and kNN faiss-vs-torch speed on a random ``bank_size`` x ``dim`` bank."""
    import torch

    from fsad_pipeline.models.coreset import kcenter_greedy
    from fsad_pipeline.models.memory_bank import NearestNeighbourIndex

    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn(bank_size, dim, generator=generator)
    probe = torch.randn(queries, dim, generator=generator)
    result: dict = {"bank_size": bank_size, "dim": dim, "queries": queries}
    started = time.perf_counter()
    kcenter_greedy(bank, 0.01, seed=seed, progress=False)
    result["coreset_seconds_ratio_0.01"] = time.perf_counter() - started
    for backend in ("faiss", "torch"):
        try:
            index = NearestNeighbourIndex(backend=backend)
            index.build(bank)
        except (ImportError, RuntimeError, ValueError) as error:  # faiss not installed
            result[f"knn_{backend}_seconds"] = None
            result[f"knn_{backend}_error"] = str(error)
            continue
        started = time.perf_counter()
        index.search(probe, 1)
        result[f"knn_{backend}_seconds"] = time.perf_counter() - started
    if result.get("knn_faiss_seconds") and result.get("knn_torch_seconds"):
        result["knn_torch_over_faiss_time"] = result["knn_torch_seconds"] / result["knn_faiss_seconds"]
    return result

