"""PatchCore-style memory bank: nearest-neighbour index and kNN patch scorer (methods.md §8).

* :class:`NearestNeighbourIndex` — L2 k-nearest-neighbour search over a bank of vectors with
  faiss (flat, IVF for large banks, GPU when available) or an exact torch fallback.
* :class:`MemoryBankScorer` — fits a (coreset-subsampled) bank on support patch features and
  scores test patch features: patch score = distance (Euclidean, or cosine on L2-normalised
  vectors) to the nearest bank vector, image score = PatchCore's re-weighted maximum (anomalib
  ``compute_anomaly_score``) or the mean of the top fraction of patch scores.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .coreset import kcenter_greedy
from .features import select_device
from .precision import resolve_precision

try:  # faiss is optional: the torch backend is exact and always available
    import faiss
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch")
DISTANCES = ("euclidean", "cosine")
IMAGE_SCORES = ("reweighted", "top_fraction")
FORMAT_VERSION = 1
BANK_FILE = "bank.npy"
INDEX_FILE = "index.faiss"
CONFIG_FILE = "memory_bank.json"

#: Candidates per query a bfloat16 search hands to the exact re-ranking (``precision``). Its inner
#: products carry a relative error of about 2^-8, so the nearest bank vector by them is not always
#: the nearest one; it almost always is among the four nearest by them. A returned distance is the
#: exact one to a bank vector, so never below the true nearest. Measured on the default run's test
#: patches against the 5.3k coreset, next to float32: with 1 candidate 4 % of the patch scores
#: came out larger (by up to 1 %), with 2 0.3 %; with 4 the Euclidean ones all equal and 2–8 in
#: 100 000 of the cosine ones larger, by at most 2.8e-3 on distances near 0.75; with 8 none
#: differed, but the search was 1.2x slower (README, speed section).
BF16_CANDIDATES = 4


def faiss_available() -> bool:
    """Whether faiss could be imported."""
    return faiss is not None


def faiss_gpu_available() -> bool:
    """Whether faiss was built with GPU support and a CUDA device is visible."""
    if faiss is None or not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0 and torch.cuda.is_available()
    except Exception:  # pragma: no cover - defensive, depends on the build
        return False


def _as_float32_array(values: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    array = np.ascontiguousarray(values, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"expected a (M, D) matrix, got shape {array.shape}")
    return array


class NearestNeighbourIndex:
    """L2 k-nearest-neighbour search over a fixed bank of vectors.

    Backends (``kind`` after :meth:`build`):

    * ``faiss_flat`` — exact ``IndexFlatL2`` (``backend="faiss"``, or ``auto`` on a GPU);
    * ``faiss_ivf`` — ``IndexIVFFlat`` with ``nlist ≈ 4·√N`` when the bank has more than
      ``ivf_threshold`` vectors (approximate; exact when ``nprobe == nlist``);
    * ``faiss_gpu_flat`` / ``faiss_gpu_ivf`` — the same on a GPU when faiss has GPU support and
      CUDA is available (``use_gpu``);
    * ``torch`` — exact search (squared-distance matmul, as ``torch.cdist``, then ``topk``) in
      query chunks; ``auto`` uses it for CPU banks up to ``ivf_threshold`` (faster than
      faiss-cpu's flat index here, see :meth:`uses_faiss`), and whenever faiss is missing.
      With ``precision`` bfloat16 (``auto`` on a chip that does it natively) the matmul runs in
      bfloat16, about twice the float32 rate, and its :data:`BF16_CANDIDATES` nearest per
      wanted neighbour are re-ranked by their exact float32 distances.

    With ``exact_distances`` (default) the distances of the returned neighbours are recomputed
    directly as ``‖q − b‖`` in float32 and the k neighbours re-sorted, so all backends return
    the same numbers and a query equal to a bank vector has distance exactly 0 (the matmul
    expansion ``‖q‖² − 2q·b + ‖b‖²`` used for the search itself loses that precision).
    """

    def __init__(
        self,
        *,
        backend: str = "auto",
        ivf_threshold: int = 200_000,
        nprobe: int = 16,
        nlist: int | None = None,
        use_gpu: bool = True,
        device: str | torch.device = "cpu",
        query_batch_size: int = 16_384,
        max_chunk_elements: int = 1 << 22,
        exact_distances: bool = True,
        precision: str = "fp32",
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        """
        Args:
            backend: ``"auto"`` (faiss for IVF banks and GPU indexes when it imports, else
                exact torch), ``"faiss"`` or ``"torch"``.
            ivf_threshold: banks with more vectors than this use ``IndexIVFFlat`` (faiss only).
            nprobe: IVF cells visited per query (capped at ``nlist``).
            nlist: IVF cell count; None = ``round(4·√N)``.
            use_gpu: move faiss indexes to the GPU when faiss-GPU and CUDA are available.
            device: device of the torch backend (``"auto"`` = CUDA when available).
            query_batch_size: queries per faiss call (one progress-bar step each).
            max_chunk_elements: torch backend: query chunk × bank size limit of one distance block.
                2^22 floats (16 MiB) stay in the L3 cache of this project's CPU while the block is
                read four more times (argmax, argmin, scaling): the shared search of a 5.3k bank ran
                1.2x faster than with 2^25 (README, speed section).
            exact_distances: recompute the returned distances directly (see class docstring).
            precision: ``fp32``, ``bf16`` or ``auto`` (bf16 where native): the torch backend's
                search product (the returned distances are always exact float32 ones).
            seed: seed of the IVF k-means.
            progress: show a tqdm bar over query batches.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "faiss" and faiss is None:
            raise ImportError("backend='faiss' requested but faiss is not installed")
        self.backend = backend
        self.ivf_threshold = int(ivf_threshold)
        self.nprobe = int(nprobe)
        self.nlist = nlist
        self.use_gpu = bool(use_gpu)
        self.device = select_device(device)
        self.query_batch_size = int(query_batch_size)
        self.max_chunk_elements = int(max_chunk_elements)
        self.exact_distances = bool(exact_distances)
        self.precision = precision
        self.search_dtype = resolve_precision(precision, self.device)
        self.seed = int(seed)
        self.progress = bool(progress)
        self.kind: str | None = None
        self.bank: np.ndarray | None = None
        self._bank_tensor: Tensor | None = None
        self._bank_sq_norms: Tensor | None = None
        self._bank_search: Tensor | None = None  # bankᵀ in the search dtype (bfloat16 only)
        self._index: Any = None
        self._gpu_resources: Any = None

    # ----------------------------------------------------------------------------------------
    # Building
    # ----------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of bank vectors (0 before :meth:`build`)."""
        return 0 if self.bank is None else int(self.bank.shape[0])

    @property
    def dim(self) -> int:
        """Vector dimension (0 before :meth:`build`)."""
        return 0 if self.bank is None else int(self.bank.shape[1])

    def uses_faiss(self, size: int) -> bool:
        """Whether a bank of ``size`` vectors gets a faiss index.

        ``auto``: faiss where it pays (an IVF bank, or a GPU index), else the exact torch search.

        On this project's 2-core CPU, torch's matrix-multiply search beat faiss-cpu's flat index
        by 2.4-2.8x at the default banks (32 images of 1024 patches against 5.3k and 21k
        vectors of 384 dims: 2.1 s against 5.1 s, 6.8 s against 19.4 s), so a flat faiss index
        is only built when asked for (``backend="faiss"``).
        """
        if self.backend != "auto":
            return self.backend == "faiss"
        return faiss is not None and (size > self.ivf_threshold or (self.use_gpu and faiss_gpu_available()))

    def build(self, bank: np.ndarray | Tensor) -> NearestNeighbourIndex:
        """Index ``bank`` (N, D) and return ``self``."""
        self.bank = _as_float32_array(bank)
        if self.size == 0:
            raise ValueError("cannot index an empty bank")
        self._bank_tensor = self._bank_search = None
        if self.uses_faiss(self.size):
            self._build_faiss()
        else:
            self.kind = "torch"
            self._index = None
        logger.info("nearest-neighbour index: %s over %d × %d", self.kind, self.size, self.dim)
        return self

    def _build_faiss(self) -> None:
        assert self.bank is not None
        size, dim = self.bank.shape
        if size > self.ivf_threshold:
            nlist = int(self.nlist) if self.nlist else int(round(4.0 * math.sqrt(size)))
            nlist = max(1, min(nlist, size))
            quantizer = faiss.IndexFlatL2(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
            index.cp.seed = self.seed
            index.train(self.bank)
            index.add(self.bank)
            index.nprobe = max(1, min(self.nprobe, nlist))
            self._quantizer = quantizer  # keep the quantizer alive with the index
            kind = "faiss_ivf"
        else:
            index = faiss.IndexFlatL2(dim)
            index.add(self.bank)
            kind = "faiss_flat"
        self._set_faiss_index(index, kind)

    def _set_faiss_index(self, index: Any, kind: str) -> None:
        """Use a CPU faiss index, moved to the GPU when possible."""
        if self.use_gpu and faiss_gpu_available():
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
            kind = kind.replace("faiss_", "faiss_gpu_")
        self._index = index
        self.kind = kind

    # ----------------------------------------------------------------------------------------
    # Searching
    # ----------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray | Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest bank vectors of each query.

        Args:
            queries: (M, D) float32 array or tensor.
            k: neighbours per query (capped at the bank size).

        Returns:
            ``distances`` (M, k) float32 L2 distances (not squared), ascending, and
            ``indices`` (M, k) long bank rows; both CPU tensors. IVF searches that find fewer
            than k vectors pad with index −1 and distance inf.
        """
        if self.bank is None:
            raise RuntimeError("search() before build()")
        query_array = _as_float32_array(queries)
        if query_array.shape[1] != self.dim:
            raise ValueError(f"query dim {query_array.shape[1]} != bank dim {self.dim}")
        k = max(1, min(int(k), self.size))
        if self.kind == "torch":
            distances, indices = self._search_torch(query_array, self.candidates(k))
        else:
            distances, indices = self._search_faiss(query_array, k)
        if self.exact_distances or indices.shape[1] > k:
            distances, indices = self.refine(query_array, indices)
        return distances[:, :k], indices[:, :k]

    def candidates(self, k: int) -> int:
        """How many neighbours the torch search takes for ``k`` wanted ones (more than ``k`` only
        when it searches in bfloat16: :data:`BF16_CANDIDATES` per query, re-ranked exactly)."""
        extra = BF16_CANDIDATES - 1 if self.search_dtype is not None else 0
        return min(self.size, k + extra)

    def inner_products(self, block: Tensor) -> Tensor:
        """``block @ bankᵀ`` as float32 (M, N), computed in the search precision."""
        bank, _ = self.bank_on_device()
        if self.search_dtype is None:
            return block @ bank.T
        if self._bank_search is None:
            self._bank_search = bank.T.to(self.search_dtype).contiguous()
        return (block.to(self.search_dtype) @ self._bank_search).float()

    def _search_faiss(self, queries: np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        count = queries.shape[0]
        distances = np.empty((count, k), dtype=np.float32)
        indices = np.empty((count, k), dtype=np.int64)
        starts = range(0, count, self.query_batch_size)
        for start in tqdm(starts, desc=f"kNN ({self.kind})", disable=not self.progress, leave=False):
            stop = min(start + self.query_batch_size, count)
            squared, found = self._index.search(queries[start:stop], k)
            distances[start:stop] = squared
            indices[start:stop] = found
        distances_t = torch.from_numpy(np.sqrt(np.maximum(distances, 0.0)))
        distances_t[torch.from_numpy(indices) < 0] = float("inf")
        return distances_t, torch.from_numpy(indices)

    def bank_on_device(self) -> tuple[Tensor, Tensor]:
        """The bank as a tensor on the search device and its rows' squared norms (cached)."""
        if self._bank_tensor is None:
            assert self.bank is not None
            self._bank_tensor = torch.from_numpy(self.bank).to(self.device)
            self._bank_sq_norms = self._bank_tensor.pow(2).sum(dim=1)
        assert self._bank_sq_norms is not None
        return self._bank_tensor, self._bank_sq_norms

    def _search_torch(self, queries: np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        _, bank_sq = self.bank_on_device()
        chunk = max(1, self.max_chunk_elements // self.size)
        distance_chunks, index_chunks = [], []
        starts = range(0, queries.shape[0], chunk)
        for start in tqdm(starts, desc="kNN (torch)", disable=not self.progress, leave=False):
            block = torch.from_numpy(queries[start : start + chunk]).to(self.device)
            squared = self.inner_products(block).mul_(-2.0).add_(bank_sq)
            squared.add_(block.pow(2).sum(dim=1, keepdim=True)).clamp_(min=0.0)
            values, found = torch.topk(squared, k, dim=1, largest=False, sorted=True)
            distance_chunks.append(values.sqrt_().cpu())
            index_chunks.append(found.cpu())
        if not distance_chunks:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        return torch.cat(distance_chunks), torch.cat(index_chunks)

    def refine(self, queries: np.ndarray | Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Recompute ``‖q − b‖`` for the found neighbours directly and re-sort each row."""
        assert self.bank is not None
        bank = torch.from_numpy(self.bank)
        query_tensor = torch.as_tensor(queries).cpu()
        k = indices.shape[1]
        rows = max(1, self.max_chunk_elements // max(1, k * self.dim))
        distance_chunks, index_chunks = [], []
        for start in range(0, queries.shape[0], rows):
            found = indices[start : start + rows]
            valid = found >= 0
            neighbours = bank[found.clamp(min=0)]  # (m, k, D)
            difference = query_tensor[start : start + rows].unsqueeze(1) - neighbours
            distances = difference.pow(2).sum(dim=2).sqrt()
            distances = torch.where(valid, distances, torch.full_like(distances, float("inf")))
            order = torch.argsort(distances, dim=1, stable=True)
            distance_chunks.append(torch.gather(distances, 1, order))
            index_chunks.append(torch.gather(found, 1, order))
        if not distance_chunks:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        return torch.cat(distance_chunks), torch.cat(index_chunks)

    # ----------------------------------------------------------------------------------------
    # Persistence
    # ----------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """faiss kinds: ``faiss.write_index`` (a GPU index is copied to the CPU first).

        torch kind: the bank as ``.npy`` (``allow_pickle=False`` on load).
        """
        if self.bank is None:
            raise RuntimeError("save() before build()")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.kind == "torch":
            np.save(path, self.bank, allow_pickle=False)
            return
        index = self._index
        if self.kind is not None and self.kind.startswith("faiss_gpu_"):
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(path))

    @classmethod
    def load(
        cls, path: str | Path, *, bank: np.ndarray | None = None, **kwargs: Any
    ) -> NearestNeighbourIndex:
        """Load what :meth:`save` wrote; ``kwargs`` go to the constructor.

        A ``.npy`` file gives the torch backend. A faiss file is read with ``faiss.read_index``;
        its vectors are reconstructed from the index unless ``bank`` is given.
        """
        path = Path(path)
        if path.suffix == ".npy":
            kwargs.setdefault("backend", "torch")
            return cls(**kwargs).build(np.load(path, allow_pickle=False))
        if faiss is None:
            if bank is None:
                raise ImportError(f"faiss is needed to read {path} (or pass the bank)")
            logger.warning("faiss missing: rebuilding %s as an exact torch index", path)
            kwargs["backend"] = "torch"
            return cls(**kwargs).build(bank)
        kwargs.setdefault("backend", "faiss")
        instance = cls(**kwargs)
        index = faiss.read_index(str(path))
        is_ivf = isinstance(index, faiss.IndexIVF)
        if is_ivf:
            index.nprobe = max(1, min(instance.nprobe, index.nlist))
        if bank is None:
            if is_ivf:
                index.make_direct_map()
            bank = index.reconstruct_n(0, index.ntotal)
        instance.bank = _as_float32_array(bank)
        instance._set_faiss_index(index, "faiss_ivf" if is_ivf else "faiss_flat")
        return instance


class MemoryBankScorer:
    """PatchCore-style kNN scorer over patch features ``(N, D, h, w)``.

    ``fit`` pools all patches of all (augmented) support images, keeps a greedy k-center coreset
    and indexes it. Patch score = L2 distance to the nearest bank vector. Image score follows
    anomalib's ``compute_anomaly_score``: for each image take the patch with the largest score
    ``s*`` (test feature ``m_test*``, nearest bank vector ``m*``), find the ``num_neighbors``
    nearest bank vectors of ``m*`` (``m*`` itself first), compute the distances ``d_j`` from
    ``m_test*`` to them and return ``(1 − softmax(d)[0]) · s*``; ``num_neighbors = 1`` gives ``s*``.
    ``image_score="top_fraction"`` instead averages the ``top_fraction`` largest patch scores.

    ``distance="cosine"`` searches L2-normalised copies of the bank and of the queries, so a
    patch score is ``‖q/‖q‖ − b/‖b‖‖ = √(2 − 2·cos)`` (monotone in the cosine distance). The
    raw bank and :attr:`index` stay as they are (the defect-type classifier takes residuals
    against them); the normalised search index lives beside it, and the coreset is selected in
    the normalised space. On the real data sets at k = 2 (lite0, full support augmentation,
    coreset 0.1) the cosine bank ranked images 0.09-0.20 AUROC better than the Euclidean one on
    tire, juice_bottle, metal_plate and textile, 0.03 worse on KolektorSDD (the study is
    summarised in conf/base/parameters_memory_bank.yml).
    """

    name = "knn"

    def __init__(
        self,
        *,
        coreset_ratio: float | None = 0.1,
        num_neighbors: int = 9,
        backend: str = "auto",
        ivf_threshold: int = 200_000,
        nprobe: int = 16,
        projection_dim: int | None = 128,
        distance: str = "euclidean",
        image_score: str = "reweighted",
        top_fraction: float = 0.01,
        precision: str = "fp32",
        seed: int = 0,
        progress: bool = True,
        device: str = "cpu",
    ) -> None:
        """
        Args:
            coreset_ratio: fraction of the pooled support patches kept by k-center greedy
                (anomalib 0.1, nehaejaz thesis 0.01); None or >= 1 keeps every patch.
            num_neighbors: bank neighbours of ``m*`` in the image-score re-weighting (anomalib 9).
            distance: ``"euclidean"`` (PatchCore) or ``"cosine"`` (L2-normalised vectors).
            image_score: ``"reweighted"`` (PatchCore) or ``"top_fraction"`` (mean of the
                ``top_fraction`` largest patch scores, at least one).
            top_fraction: share of an image's patches averaged by ``image_score="top_fraction"``.
            backend: kNN backend, ``"auto"``, ``"faiss"`` or ``"torch"``.
            ivf_threshold: banks larger than this use a faiss IVF index.
            nprobe: IVF cells visited per query.
            projection_dim: random-projection dimension of the coreset distances (None = off).
            precision: the torch search's matmul precision (``fp32``, ``bf16``, ``auto``: see
                :class:`NearestNeighbourIndex`); the patch scores are exact float32 distances.
            seed: coreset (projection, start point) and IVF k-means seed.
            progress: tqdm bars for the coreset loop and the kNN search.
            device: device of the coreset selection and of the torch kNN backend.
        """
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors must be >= 1, got {num_neighbors}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {image_score!r}")
        if not 0.0 < float(top_fraction) <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        self.distance = distance
        self.image_score = image_score
        self.top_fraction = float(top_fraction)
        self.coreset_ratio = None if coreset_ratio is None else float(coreset_ratio)
        self.num_neighbors = int(num_neighbors)
        self.backend = backend
        self.ivf_threshold = int(ivf_threshold)
        self.nprobe = int(nprobe)
        self.projection_dim = None if projection_dim is None else int(projection_dim)
        self.precision = precision
        resolve_precision(precision, "cpu")  # an unknown setting fails here, not at the first search
        self.seed = int(seed)
        self.progress = bool(progress)
        self.device = device
        self.index: NearestNeighbourIndex | None = None
        # distance="cosine": the same bank L2-normalised, the index every search goes to.
        self._unit_index: NearestNeighbourIndex | None = None
        self.feature_dim: int | None = None
        self.grid_size: tuple[int, int] | None = None
        self.num_support_patches: int | None = None
        # Row of every bank vector in the support patches it was fitted on (image-major,
        # h·w rows per image); kept in memory for leave_out_images, not saved.
        self.source_rows: np.ndarray | None = None

    # ----------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-friendly dict."""
        return {
            "coreset_ratio": self.coreset_ratio,
            "num_neighbors": self.num_neighbors,
            "backend": self.backend,
            "ivf_threshold": self.ivf_threshold,
            "nprobe": self.nprobe,
            "projection_dim": self.projection_dim,
            "distance": self.distance,
            "image_score": self.image_score,
            "top_fraction": self.top_fraction,
            "precision": self.precision,
            "seed": self.seed,
            "progress": self.progress,
            "device": str(self.device),
        }

    def _new_index(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "ivf_threshold": self.ivf_threshold,
            "nprobe": self.nprobe,
            "device": self.device,
            "precision": self.precision,
            "seed": self.seed,
            "progress": self.progress,
        }

    @property
    def bank(self) -> np.ndarray:
        """The memory bank (M, D) float32."""
        if self.index is None or self.index.bank is None:
            raise RuntimeError("the scorer is not fitted")
        return self.index.bank

    @staticmethod
    def _flatten(features: Tensor) -> Tensor:
        if features.dim() != 4:
            raise ValueError(f"expected (N, D, h, w) features, got shape {tuple(features.shape)}")
        return features.detach().float().permute(0, 2, 3, 1).reshape(-1, features.shape[1]).cpu()

    def _to_search_space(self, rows: Tensor) -> Tensor:
        """(M, D) rows as the search index sees them (L2-normalised for the cosine distance)."""
        return F.normalize(rows, dim=1) if self.distance == "cosine" else rows

    def set_progress(self, progress: bool) -> None:
        """Show (or hide) the search's progress bars from now on (a loaded bank keeps the setting
        it was fitted with: ``fsad-inspect --quiet`` turns it off)."""
        self.progress = bool(progress)
        for index in (self.index, self._unit_index):
            if index is not None:
                index.progress = self.progress

    def _set_bank_index(self, index: NearestNeighbourIndex) -> None:
        """Keep ``index`` (raw vectors) and build the normalised search index it needs."""
        self.index = index
        self._unit_index = None
        if self.distance == "cosine":
            unit = self._to_search_space(torch.from_numpy(index.bank))
            self._unit_index = NearestNeighbourIndex(**self._new_index()).build(unit)

    def fit(self, features: Tensor) -> MemoryBankScorer:
        """Build the bank from support patch features (N, D, h, w) and return ``self``."""
        patches = self._flatten(features)
        self.feature_dim = int(features.shape[1])
        self.grid_size = (int(features.shape[2]), int(features.shape[3]))
        self.num_support_patches = int(patches.shape[0])
        selected = torch.arange(patches.shape[0])
        if self.coreset_ratio is not None and self.coreset_ratio < 1.0:
            selected = kcenter_greedy(  # in the space the bank is searched in
                self._to_search_space(patches),
                self.coreset_ratio,
                projection_dim=self.projection_dim,
                seed=self.seed,
                progress=self.progress,
                device=select_device(self.device),
            )
            patches = patches[selected]
        self.source_rows = selected.cpu().numpy().astype(np.int64)
        self._set_bank_index(NearestNeighbourIndex(**self._new_index()).build(patches))
        logger.info(
            "memory bank: %d of %d support patches (%s)",
            self.index.size,
            self.num_support_patches,
            self.index.kind,
        )
        return self

    def leave_out_images(self, first: int, stop: int) -> MemoryBankScorer:
        """A scorer whose bank drops every vector taken from support images ``first..stop-1``.

        The leave-one-support-out validation needs a bank without one support's views for each
        support. Re-running the coreset on the remaining patches costs a k-center greedy pass per
        support (k + 1 in all, the larger part of the memory-bank stage at k = 8); keeping the
        full coreset's vectors that came from the remaining supports costs nothing. The subset is
        not the remaining supports' own coreset (a patch whose nearest centre was a left-out one
        reaches a farther centre), but on the textile data the held-out supports' image scores
        differ from a refit by -1.3 % (k = 2) and +0.3 % (k = 4) on average, while the coreset
        work of the stage falls 1.5x and 2.9x. Without a coreset (ratio >= 1) the two are
        identical (tested).
        """
        if self.index is None or self.source_rows is None or self.grid_size is None:
            raise RuntimeError("leave_out_images() needs a scorer fitted in this process")
        per_image = self.grid_size[0] * self.grid_size[1]
        source_image = self.source_rows // per_image
        keep = (source_image < first) | (source_image >= stop)
        if not keep.any():
            raise ValueError(f"leaving out images {first}..{stop - 1} leaves an empty bank")
        fold = MemoryBankScorer(**{**self.config(), "progress": False})
        fold.feature_dim, fold.grid_size = self.feature_dim, self.grid_size
        fold.num_support_patches = self.num_support_patches - (stop - first) * per_image
        # Rows renumbered as if the left-out images had never been there.
        rows = self.source_rows[keep]
        fold.source_rows = np.where(rows >= stop * per_image, rows - (stop - first) * per_image, rows)
        fold._set_bank_index(NearestNeighbourIndex(**fold._new_index()).build(self.index.bank[keep]))
        return fold

    def _require_fitted(self, features: Tensor) -> NearestNeighbourIndex:
        """The index searches go to (the normalised one for the cosine distance)."""
        if self.index is None:
            raise RuntimeError("the scorer is not fitted")
        if features.dim() != 4 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"expected (N, {self.feature_dim}, h, w) features, got {tuple(features.shape)}"
            )
        if self.distance == "cosine":
            if self._unit_index is None:
                self._set_bank_index(self.index)
            assert self._unit_index is not None
            return self._unit_index
        return self.index

    def patch_scores(self, features: Tensor) -> Tensor:
        """Distance of every patch to its nearest bank vector, (N, h, w) float32 CPU."""
        index = self._require_fitted(features)
        count, _, height, width = features.shape
        distances, _ = index.search(self._to_search_space(self._flatten(features)), k=1)
        return distances[:, 0].reshape(count, height, width)

    def patch_scores_and_raw_distances(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`patch_scores` and each patch's L2 distance to its nearest raw bank vector, (N, h, w) each.

        The anomalous bank's normal distance ``d_n`` is the second (its normal bank is this
        scorer's coreset as raw vectors). With the cosine distance the two searches differ only
        in how they read the same inner products ``q·b``: one matrix product per query chunk
        serves both (the nearest by ``q·b/‖b‖``, and by ``‖b‖² − 2q·b``), where two searches
        computed it twice; together they were a third of the default run's test scoring. Both
        distances are then recomputed directly for the neighbour found (for each of the
        :data:`BF16_CANDIDATES` found by a bfloat16 product, keeping the nearest), as the
        index's ``exact_distances`` does. With the Euclidean distance they are one and the same; a faiss
        bank is searched twice.
        """
        index = self._require_fitted(features)
        assert self.index is not None
        count, _, height, width = features.shape
        if self.distance == "euclidean":
            scores = self.patch_scores(features)
            return scores, scores
        queries = self._flatten(features)
        if self.index.kind != "torch" or index.kind != "torch":
            raw, _ = self.index.search(queries, k=1)
            return self.patch_scores(features), raw[:, 0].reshape(count, height, width)
        _, raw_sq_norms = self.index.bank_on_device()
        inverse_norms = raw_sq_norms.clamp_min(1e-24).rsqrt()
        candidates = self.index.candidates(1)
        chunk = max(1, self.index.max_chunk_elements // self.index.size)
        scores = torch.empty(queries.shape[0])
        raw_distances = torch.empty(queries.shape[0])
        starts = range(0, queries.shape[0], chunk)
        for start in tqdm(starts, desc="kNN (torch, shared)", disable=not self.progress, leave=False):
            block = queries[start : start + chunk].to(self.index.device)
            inner = self.index.inner_products(block)
            nearest_unit = (inner * inverse_norms).topk(candidates, dim=1).indices  # largest cosine
            # smallest ‖q‖² + ‖b‖² − 2q·b
            nearest_raw = inner.mul_(-2.0).add_(raw_sq_norms).topk(candidates, dim=1, largest=False).indices
            stop = start + block.shape[0]
            scores[start:stop] = index.refine(F.normalize(block, dim=1), nearest_unit)[0][:, 0]
            raw_distances[start:stop] = self.index.refine(block, nearest_raw)[0][:, 0]
        return scores.reshape(count, height, width), raw_distances.reshape(count, height, width)

    def image_scores(self, features: Tensor, patch_scores: Tensor | None = None) -> Tensor:
        """Image scores (N,): re-weighted maximum or top-fraction mean (see the class docstring)."""
        index = self._require_fitted(features)
        if patch_scores is None:
            patch_scores = self.patch_scores(features)
        count = features.shape[0]
        flat_scores = patch_scores.reshape(count, -1).float().cpu()
        if self.image_score == "top_fraction":
            top = max(1, int(round(self.top_fraction * flat_scores.shape[1])))
            return flat_scores.topk(top, dim=1).values.mean(dim=1)
        max_scores, max_positions = flat_scores.max(dim=1)
        if self.num_neighbors == 1:
            return max_scores
        patches = features.detach().float().flatten(2).cpu()  # (N, D, h·w)
        if self.distance == "cosine":
            patches = F.normalize(patches, dim=1)
        max_features = patches[torch.arange(count), :, max_positions]  # m_test*, (N, D)
        _, nearest = index.search(max_features, k=1)  # m* = bank[nearest]
        bank = torch.from_numpy(index.bank)
        _, support = index.search(bank[nearest[:, 0]], k=self.num_neighbors)  # (N, K)
        distances = (max_features.unsqueeze(1) - bank[support]).pow(2).sum(dim=2).sqrt()
        weights = 1.0 - F.softmax(distances, dim=1)[:, 0]
        return weights * max_scores

    def score_features(self, features: Tensor) -> dict[str, Tensor]:
        """``patch_scores`` (N, h, w) and ``image_scores`` (N,) in one pass."""
        patch_scores = self.patch_scores(features)
        return {"patch_scores": patch_scores, "image_scores": self.image_scores(features, patch_scores)}

    # ----------------------------------------------------------------------------------------
    # Persistence
    # ----------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write ``bank.npy``, ``index.faiss`` (faiss backends) and ``memory_bank.json``."""
        if self.index is None or self.index.bank is None:
            raise RuntimeError("save() before fit()")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / BANK_FILE, self.index.bank, allow_pickle=False)
        if self.index.kind != "torch":
            self.index.save(directory / INDEX_FILE)
        metadata = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "config": self.config(),
            "feature_dim": self.feature_dim,
            "grid_size": list(self.grid_size) if self.grid_size else None,
            "bank_size": self.index.size,
            "num_support_patches": self.num_support_patches,
            "index_kind": self.index.kind,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(metadata, indent=2))

    @classmethod
    def load(cls, directory: str | Path, **overrides: Any) -> MemoryBankScorer:
        """Restore a scorer written by :meth:`save`; ``overrides`` replace saved constructor args."""
        directory = Path(directory)
        metadata = json.loads((directory / CONFIG_FILE).read_text())
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported memory bank format {metadata.get('format_version')}")
        scorer = cls(**{**metadata["config"], **overrides})
        scorer.feature_dim = metadata["feature_dim"]
        scorer.grid_size = tuple(metadata["grid_size"]) if metadata["grid_size"] else None
        scorer.num_support_patches = metadata["num_support_patches"]
        bank = np.load(directory / BANK_FILE, allow_pickle=False)
        index_path = directory / INDEX_FILE
        # A saved faiss index is reused where this machine would build one for the bank (a
        # model trained beside faiss-gpu, loaded on a CPU, searches with torch instead).
        index = NearestNeighbourIndex(**scorer._new_index())
        if index_path.exists() and index.uses_faiss(len(bank)):
            scorer._set_bank_index(NearestNeighbourIndex.load(index_path, bank=bank, **scorer._new_index()))
        else:
            scorer._set_bank_index(index.build(bank))
        return scorer
