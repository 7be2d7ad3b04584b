"""Kedro datasets for the project's own artifact formats (thin wrappers over ``artifacts``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from kedro.io import AbstractDataset

from fsad_pipeline import artifacts
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet


class _PathDataset(AbstractDataset):
    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return self._filepath.exists()


class NumpyDataset(_PathDataset):
    """A single array as ``.npy`` (never pickled)."""

    def load(self) -> np.ndarray:
        return artifacts.load_array(self._filepath)

    def save(self, data: np.ndarray) -> None:
        artifacts.save_array(self._filepath, data)


class PseudoAnomalySetDataset(_PathDataset):
    """A folder of PNG normals/images/masks plus ``samples.csv`` (see ``artifacts.save_sample_set``)."""

    def load(self) -> PseudoAnomalySet:
        return artifacts.load_sample_set(self._filepath)

    def save(self, data: PseudoAnomalySet) -> None:
        artifacts.save_sample_set(self._filepath, data)

    def _exists(self) -> bool:
        return (self._filepath / "samples.csv").exists()
