"""Scoring many image files with the scorer ensemble, in chunks, with progress and timing.

:func:`iter_scored_chunks` is the one loop that reads, resizes and scores files chunk by chunk;
the batch run (:func:`score_paths`, whole test set in memory) and the inference path (streams
each chunk to disk, skips unreadable files) both use it.

How a file is brought to the ensemble's working size is ``fit``: ``"resize"`` (every side to the
working size, as the training data were: the anomaly map then maps back onto the file's own
pixel grid, which evaluation against ground-truth masks needs) or ``"crop"`` (keep the file's
aspect, cover the working size and centre-crop, :func:`fsad_pipeline.data.geometry.fit_to_size`:
a file of another aspect than the model's is not squeezed; the same aspect is a plain resize).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm.auto import tqdm

from fsad_pipeline.data.geometry import fit_to_size
from fsad_pipeline.data.images import DEFAULT_MAX_PIXELS, BadImageError, read_image, resize_image
from fsad_pipeline.scoring.base import ScoreBatch
from fsad_pipeline.scoring.ensemble import ScorerEnsemble


@dataclass
class ScoredChunk:
    """One chunk's readable images and their scores; ``indices`` point into the input paths."""

    indices: np.ndarray  # (n,) positions of the scored files in the input list
    paths: list[str]
    images: np.ndarray  # (n, H, W, 3) uint8, as scored (resized)
    original_sizes: list[tuple[int, int]]  # (height, width) of each file before resizing
    fused: dict[str, np.ndarray]  # anomaly_map (n, H, W), pred_score (n,)
    per_scorer: dict[str, ScoreBatch]
    rejects: list[dict] = field(default_factory=list)  # {"path", "reason"} of unreadable files

    def __len__(self) -> int:
        return len(self.paths)


#: How a file is brought to the working size (see the module docstring).
FITS = ("resize", "crop")


def _read_chunk(
    paths: Sequence[str], size: tuple[int, int], max_pixels: int, skip_bad: bool, fit: str = "resize"
) -> tuple[list[int], np.ndarray, list[tuple[int, int]], list[dict]]:
    kept: list[int] = []
    images: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    rejects: list[dict] = []
    for offset, path in enumerate(paths):
        try:
            image = read_image(path, max_pixels=max_pixels)
        except BadImageError as error:
            if not skip_bad:
                raise
            rejects.append({"path": str(path), "reason": error.reason})
            continue
        kept.append(offset)
        sizes.append(image.shape[:2])
        images.append(resize_image(image, size) if fit == "resize" else fit_to_size(image, size))
    stacked = np.stack(images) if images else np.zeros((0, *size, 3), dtype=np.uint8)
    return kept, stacked, sizes, rejects


def iter_scored_chunks(
    ensemble: ScorerEnsemble,
    paths: Sequence[str],
    *,
    chunk_size: int = 32,
    max_pixels: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    desc: str = "scoring",
    fit: str = "resize",
) -> Iterator[ScoredChunk]:
    """Read, resize (``fit``: see the module doc), score and fuse ``paths`` ``chunk_size`` files at a time.

    With ``skip_bad`` an unreadable file (:class:`BadImageError`) is reported in the chunk's
    ``rejects`` and the others are still scored; without it the error propagates.
    """
    if ensemble.fusion is None:
        raise ValueError("the ensemble needs its fusion before scoring")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    guard = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    with tqdm(total=len(paths), desc=desc, disable=not progress, unit="img") as bar:
        for start in range(0, len(paths), chunk_size):
            chunk = [str(p) for p in paths[start : start + chunk_size]]
            kept, images, sizes, rejects = _read_chunk(chunk, ensemble.image_size, guard, skip_bad, fit)
            if kept:
                outputs = ensemble.score_each(images)
                fused = ensemble.fusion.fuse(outputs)
            else:
                outputs, fused = {}, {"anomaly_map": np.zeros((0, *ensemble.image_size), np.float32),
                                      "pred_score": np.zeros(0, np.float64)}
            bar.update(len(chunk))
            yield ScoredChunk(
                indices=start + np.asarray(kept, dtype=np.int64),
                paths=[chunk[i] for i in kept],
                images=images,
                original_sizes=sizes,
                fused=fused,
                per_scorer=outputs,
                rejects=rejects,
            )


def score_paths(
    ensemble: ScorerEnsemble,
    paths: Sequence[str],
    *,
    chunk_size: int = 32,
    max_pixels: int | None = None,
    map_dtype: type = np.float16,
    progress: bool = True,
) -> dict:
    """Score image files with every scorer and fuse (every file must be readable).

    Returns ``anomaly_maps`` (N, H, W) and ``pred_scores`` (N,) of the fused result,
    ``scorer_maps`` (S, N, H, W), ``scorer_scores`` {name: (N,)}, seconds and images/s. Reading
    and resizing the files is part of the timing (that is what a user waits for).
    """
    if ensemble.fusion is None:
        raise ValueError("the ensemble needs its fusion before scoring")
    height, width = ensemble.image_size
    names = ensemble.fusion.scorers
    maps = np.zeros((len(paths), height, width), dtype=map_dtype)
    scorer_maps = np.zeros((len(names), len(paths), height, width), dtype=map_dtype)
    scores = np.zeros(len(paths), dtype=np.float32)
    scorer_scores = {name: np.zeros(len(paths), dtype=np.float32) for name in names}
    started = time.perf_counter()
    for chunk in iter_scored_chunks(
        ensemble, paths, chunk_size=chunk_size, max_pixels=max_pixels, skip_bad=False, progress=progress
    ):
        rows = chunk.indices
        maps[rows] = chunk.fused["anomaly_map"].astype(map_dtype)
        scores[rows] = chunk.fused["pred_score"]
        for index, name in enumerate(names):
            scorer_maps[index, rows] = chunk.per_scorer[name]["anomaly_map"].astype(map_dtype)
            scorer_scores[name][rows] = chunk.per_scorer[name]["pred_score"]
    seconds = time.perf_counter() - started
    return {
        "anomaly_maps": maps,
        "pred_scores": scores,
        "scorer_maps": scorer_maps,
        "scorer_scores": scorer_scores,
        "seconds": seconds,
        "images_per_second": len(paths) / seconds if seconds > 0 else float("nan"),
    }


def fused_scores_of_paths(
    ensemble: ScorerEnsemble,
    paths: Sequence[str],
    *,
    chunk_size: int = 32,
    max_pixels: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """The fused image score (N,) of each file, running only what that score reads.

    The threshold's calibration images need nothing else: no maps, no scorer the fusion gives no
    image-score weight. An image scorer without weight is skipped; the patch scorers run together
    (one feature pass and one search serve them all) when any of them has weight. The scores are
    those :func:`score_paths` gives (the same reading, the same scorers for what is weighted).
    On the default run the fusion's image score is DFD alone, so the 100 calibration images skip
    the memory-bank features and the search; where it is kNN alone they skip DFD.
    """
    fusion = ensemble.fusion
    if fusion is None:
        raise ValueError("the ensemble needs its fusion before scoring")
    weighted = {name for name, weight in fusion.score_weights.items() if weight}
    lean = replace(
        ensemble,
        image_scorers={name: s for name, s in ensemble.image_scorers.items() if name in weighted},
        patch_scorers=ensemble.patch_scorers if weighted & set(ensemble.patch_scorers) else {},
        fusion=replace(fusion, map_weights={name: 0.0 for name in fusion.map_weights}),
    )
    scores = np.zeros(len(paths), dtype=np.float32)
    for chunk in iter_scored_chunks(lean, paths, chunk_size=chunk_size, max_pixels=max_pixels, progress=progress):
        scores[chunk.indices] = chunk.fused["pred_score"]
    return scores
