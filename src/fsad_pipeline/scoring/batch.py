"""Scoring many image files with the scorer ensemble, in chunks, with progress and timing."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from fsad_pipeline.data.sampling import load_images
from fsad_pipeline.scoring.ensemble import ScorerEnsemble


def score_paths(
    ensemble: ScorerEnsemble,
    paths: Sequence[str],
    *,
    chunk_size: int = 32,
    max_pixels: int | None = None,
    map_dtype: type = np.float16,
    progress: bool = True,
) -> dict:
    """Score image files with every scorer and fuse.

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
    with tqdm(total=len(paths), desc="scoring", disable=not progress, unit="img") as bar:
        for start in range(0, len(paths), chunk_size):
            chunk = list(paths[start : start + chunk_size])
            stop = start + len(chunk)
            outputs = ensemble.score_each(load_images(chunk, (height, width), max_pixels=max_pixels))
            fused = ensemble.fusion.fuse(outputs)
            maps[start:stop] = fused["anomaly_map"].astype(map_dtype)
            scores[start:stop] = fused["pred_score"]
            for index, name in enumerate(names):
                scorer_maps[index, start:stop] = outputs[name]["anomaly_map"].astype(map_dtype)
                scorer_scores[name][start:stop] = outputs[name]["pred_score"]
            bar.update(len(chunk))
    seconds = time.perf_counter() - started
    return {
        "anomaly_maps": maps,
        "pred_scores": scores,
        "scorer_maps": scorer_maps,
        "scorer_scores": scorer_scores,
        "seconds": seconds,
        "images_per_second": len(paths) / seconds if seconds > 0 else float("nan"),
    }
