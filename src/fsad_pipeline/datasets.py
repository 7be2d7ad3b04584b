"""Kedro datasets for the project's own artifact formats (thin wrappers over ``artifacts``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from kedro.io import AbstractDataset

from fsad_pipeline import artifacts
from fsad_pipeline.scoring.dfd_scorer import DFDScorer
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


class _ModelDirectoryDataset(_PathDataset):
    """A fitted model saved by its own ``save(directory)``, written atomically; ``marker`` is
    the file whose presence means the folder holds a complete model."""

    marker = ""

    def save(self, data) -> None:
        with artifacts.atomic_directory(self._filepath) as staging:
            data.save(staging)

    def _exists(self) -> bool:
        return (self._filepath / self.marker).exists()


class DFDScorerDataset(_ModelDirectoryDataset):
    """A trained DFD scorer: ``dfd.safetensors`` + ``dfd_config.json`` + ``scorer.json``, written atomically."""

    marker = "scorer.json"

    def __init__(self, filepath: str, device: str = "auto", metadata: dict[str, Any] | None = None):
        super().__init__(filepath, metadata)
        self._device = device

    def load(self) -> DFDScorer:
        return DFDScorer.load(self._filepath, device=self._device)


class PatchScorerSetDataset(_ModelDirectoryDataset):
    """The fitted patch scorers (kNN bank, Gaussian, anomalous bank), written atomically."""

    marker = "features.json"

    def load(self):
        from fsad_pipeline.scoring.patch_scorers import PatchScorerSet

        return PatchScorerSet.load(self._filepath)


class DefectTypeClassifiersDataset(_ModelDirectoryDataset):
    """The fitted defect-type classifier and baselines (may be empty: no shots), written atomically."""

    marker = "defect_types.json"

    def load(self):
        from fsad_pipeline.classification.defect_types import DefectTypeClassifiers

        return DefectTypeClassifiers.load(self._filepath)


class NestedArraysDataset(_PathDataset):
    """``{group: {name: array}}`` as one ``.npz`` (e.g. each scorer's validation maps and scores)."""

    def load(self) -> dict:
        return artifacts.load_nested_arrays(self._filepath)

    def save(self, data: dict) -> None:
        artifacts.save_nested_arrays(self._filepath, data)


class EncoderRegistryDataset(_PathDataset):
    """The encoder registry folder: ``save`` writes ``<filepath>/<encoder name>/`` atomically.

    ``load`` returns ``{name: encoder.json contents}`` of every registered encoder; scorers load
    an encoder by name through ``build_backbone("registered:<name>")``, not through the catalog.
    """

    def load(self) -> dict:
        from fsad_pipeline.models.registration import ENCODER_CONFIG

        if not self._filepath.is_dir():
            return {}
        return {
            p.name: artifacts.read_json(p / ENCODER_CONFIG)
            for p in sorted(self._filepath.iterdir())
            if (p / ENCODER_CONFIG).is_file()
        }

    def save(self, data) -> None:
        with artifacts.atomic_directory(self._filepath / data.name) as staging:
            data.save(staging)
