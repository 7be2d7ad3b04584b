"""The scorer interface shared by every anomaly scorer (see shared/design.md).

A scorer is fitted once (on support images, pseudo-anomalies, …) and then scores batches of
uint8 RGB images into ``anomaly_map`` (B×H×W) and ``pred_score`` (B). Fusion, calibration,
evaluation, inference and the benchmark only ever talk to this interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, TypedDict, runtime_checkable

import numpy as np


class ScoreBatch(TypedDict):
    anomaly_map: np.ndarray  # (B, H, W) float32, higher = more anomalous
    pred_score: np.ndarray  # (B,) float32


@runtime_checkable
class Scorer(Protocol):
    name: str
    image_size: tuple[int, int]

    def score(self, images: np.ndarray) -> ScoreBatch:
        """Score uint8 RGB images (B, H, W, 3) already resized to ``image_size``."""

    def save(self, directory: str | Path) -> None:
        """Write the fitted state (safetensors / JSON / .npy only)."""
