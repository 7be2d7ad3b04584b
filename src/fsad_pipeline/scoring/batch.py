"""Scoring many image files with any scorer, in chunks, with progress and timing."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from fsad_pipeline.data.sampling import load_images
from fsad_pipeline.scoring.base import Scorer


def score_paths(
    scorer: Scorer,
    paths: Sequence[str],
    *,
    chunk_size: int = 32,
    max_pixels: int | None = None,
    map_dtype: type = np.float16,
    progress: bool = True,
) -> dict:
    """Score image files; returns ``anomaly_maps`` (N, H, W), ``pred_scores`` (N,), seconds and img/s.

    Reading and resizing the files is part of the timing (that is what a user waits for).
    """
    height, width = scorer.image_size
    maps = np.zeros((len(paths), height, width), dtype=map_dtype)
    scores = np.zeros(len(paths), dtype=np.float32)
    started = time.perf_counter()
    with tqdm(total=len(paths), desc=f"scoring ({scorer.name})", disable=not progress, unit="img") as bar:
        for start in range(0, len(paths), chunk_size):
            chunk = list(paths[start : start + chunk_size])
            images = load_images(chunk, (height, width), max_pixels=max_pixels)
            out = scorer.score(images)
            maps[start : start + len(chunk)] = out["anomaly_map"].astype(map_dtype)
            scores[start : start + len(chunk)] = out["pred_score"]
            bar.update(len(chunk))
    seconds = time.perf_counter() - started
    return {
        "anomaly_maps": maps,
        "pred_scores": scores,
        "seconds": seconds,
        "images_per_second": len(paths) / seconds if seconds > 0 else float("nan"),
    }
