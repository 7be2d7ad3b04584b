"""The plain patch-kNN reference: the floor the pipeline has to clear.

Not a pipeline scorer. It is the simplest few-shot detector that uses the same backbone and patch
features as the memory-bank scorer, with every refinement taken away: the bank is ALL patch
features of the k raw support images (no support augmentation, no coreset, no projection beyond
what the feature extractor itself does), searched exactly (torch), and the anomaly map is the
project's :func:`~fsad_pipeline.models.anomaly_map.patch_scores_to_map` of the nearest-neighbour
distances (upsampling + Gaussian smoothing with ``memory_bank.map_sigma``). Two variants come
out of one feature extraction (:data:`REFERENCE_VARIANTS`):

* ``plain``: cosine distance (L2-normalised features, searched by Euclidean distance, so a patch
  scores the chord sqrt(2 - 2 cos): the same neighbour and patch order as 1 - cos, on a
  slightly different scale), image score = mean of the top 1 % patch scores. This is the recipe behind the floor figures measured for the issue
  (../shared/reference/offline_assets.md: Lite0 256 px, k = 2: metal_plate 0.90, juice_bottle
  0.85, kolektorsdd 0.68, tire 0.61, textile ~0.51), and the stronger of the two on most sets.
* ``plain_max``: Euclidean distance, image score = the map's maximum (the textbook definition).

If the fused pipeline does not beat the better of them on the same test images, its extra
machinery (synthesis, DFD, fusion) is not paying for itself. :func:`plain_knn_reference` is the
pure function; :func:`reference_for_run` reads a finished run (its support round 0, its test
images, its parameters) and evaluates both variants with the project's own metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fsad_pipeline.data.geometry import ResizedMaps, as_hw
from fsad_pipeline.data.sampling import DEFAULT_PIXEL_MAX_SIDE, load_images, load_native_gt_masks
from fsad_pipeline.evaluation.report import evaluate_predictions
from fsad_pipeline.models.anomaly_map import patch_scores_to_map
from fsad_pipeline.models.features import PatchFeatureExtractor, extract_features
from fsad_pipeline.models.memory_bank import NearestNeighbourIndex
from fsad_pipeline.scoring.dfd_scorer import FeatureConfig

#: The metrics kept from :func:`evaluate_predictions` for the reference. It has no threshold, so
#: ``accuracy_at_threshold`` (and the F1 threshold, an oracle on the test set) are left out.
REFERENCE_METRICS = ("image_auroc", "image_auroc_per_defect_type", "pixel_auroc", "aupro", "f1_max",
                     "n_images", "n_anomalous")


#: name -> (distance, top fraction of patch scores averaged into the image score; None: map maximum).
REFERENCE_VARIANTS: dict[str, tuple[str, float | None]] = {"plain": ("cosine", 0.01), "plain_max": ("euclidean", None)}


def _patches(features: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) patch features -> (N·h·w, D) rows."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


class PlainKnnReference:
    """The reference fitted on k support images; :meth:`score` takes test images in any chunks."""

    def __init__(
        self,
        feature_config: FeatureConfig,
        *,
        image_size: int | Sequence[int] | None = None,
        map_sigma: float = 4.0,
        device: str = "cpu",
        extractor: PatchFeatureExtractor | None = None,
    ) -> None:
        """
        Args:
            feature_config: backbone and patch features (the run's ``memory_bank.features``).
            image_size: ``H`` or ``(H, W)`` the images are scored at; None: ``feature_config.image_size``.
            map_sigma: Gaussian smoothing of the patch-score maps (the run's ``memory_bank.map_sigma``).
            device: feature extraction and search device.
            extractor: an already built extractor for ``feature_config`` (tests, repeated use).
        """
        self.features = feature_config
        self.image_size = as_hw(feature_config.image_size if image_size is None else image_size)
        self.map_sigma = float(map_sigma)
        self.device = device
        self.extractor = extractor if extractor is not None else feature_config.build_extractor()
        self.indexes: dict[str, NearestNeighbourIndex] = {}

    def _extract(self, images: np.ndarray, desc: str) -> torch.Tensor:
        return extract_features(
            self.extractor, images, image_size=self.image_size, batch_size=self.features.batch_size,
            device=self.device, dual_path=False, progress=False, desc=desc,
        )

    def fit(self, support_images: np.ndarray) -> PlainKnnReference:
        """Bank = every patch of every support image (uint8 (k, H, W, 3)), raw and L2-normalised."""
        if len(support_images) == 0:
            raise ValueError("the plain kNN reference needs at least one support image")
        bank = _patches(self._extract(support_images, "features (reference support)"))
        self.indexes = {
            "euclidean": NearestNeighbourIndex(backend="torch", device=self.device).build(bank),
            "cosine": NearestNeighbourIndex(backend="torch", device=self.device).build(F.normalize(bank, dim=1)),
        }
        return self

    @property
    def bank_size(self) -> int:
        return 0 if not self.indexes else self.indexes["euclidean"].size

    def score(self, images: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Per variant of :data:`REFERENCE_VARIANTS`: ``anomaly_map`` (N, H, W) float32 and ``pred_score`` (N,)."""
        if not self.indexes:
            raise RuntimeError("score() before fit()")
        features = self._extract(images, "features (reference test)")
        count, _, height, width = features.shape
        queries = _patches(features)
        outputs = {}
        for name, (distance, top_fraction) in REFERENCE_VARIANTS.items():
            rows = F.normalize(queries, dim=1) if distance == "cosine" else queries
            distances, _ = self.indexes[distance].search(rows, k=1)
            patch_scores = distances[:, 0].reshape(count, height, width).float()
            maps = patch_scores_to_map(patch_scores, self.image_size, self.map_sigma).cpu().numpy().astype(np.float32)
            if top_fraction is None:
                scores = maps.reshape(count, -1).max(axis=1)
            else:
                flat = patch_scores.reshape(count, -1)
                top = max(1, int(round(top_fraction * flat.shape[1])))
                scores = flat.topk(top, dim=1).values.mean(dim=1).cpu().numpy().astype(np.float32)
            outputs[name] = {"anomaly_map": maps, "pred_score": scores}
        return outputs


def plain_knn_reference(
    support_images: np.ndarray,
    test_images: np.ndarray,
    feature_config: FeatureConfig,
    *,
    image_size: int | Sequence[int] | None = None,
    map_sigma: float = 4.0,
    batch_size: int = 32,
    device: str = "cpu",
    extractor: PatchFeatureExtractor | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The plain patch-kNN reference's maps and scores for ``test_images`` (uint8 (N, H, W, 3)).

    Returns ``{variant: {"anomaly_map": (N, H, W) float32, "pred_score": (N,) float32}}`` for each
    of :data:`REFERENCE_VARIANTS`, plus ``"bank_size"``; the test images are scored ``batch_size``
    at a time (bounded memory for the distance blocks).
    """
    reference = PlainKnnReference(
        feature_config, image_size=image_size, map_sigma=map_sigma, device=device, extractor=extractor
    ).fit(support_images)
    output = score_in_chunks(reference, len(test_images), lambda start, stop: test_images[start:stop], batch_size, progress)
    return {**output, "bank_size": reference.bank_size}


def score_in_chunks(
    reference: PlainKnnReference, count: int, chunk: Callable[[int, int], np.ndarray], batch_size: int, progress: bool
) -> dict[str, np.ndarray]:
    """Score ``count`` images ``batch_size`` at a time; ``chunk(start, stop)`` gives (reads) those images.

    Returns one ``{"anomaly_map", "pred_score"}`` per variant, concatenated over the chunks."""
    chunks = [
        reference.score(chunk(start, min(start + batch_size, count)))
        for start in tqdm(range(0, count, batch_size), desc="plain kNN reference", disable=not progress, unit="batch")
    ]
    empty = {"anomaly_map": np.zeros((0, *reference.image_size), np.float32), "pred_score": np.zeros(0, np.float32)}
    return {
        name: {key: np.concatenate([c[name][key] for c in chunks]) for key in empty} if chunks else dict(empty)
        for name in REFERENCE_VARIANTS
    }


def evaluate_reference(
    test: pd.DataFrame,
    output: dict[str, Any],
    fpr_limit: float,
    pixel_max_side: int | None = DEFAULT_PIXEL_MAX_SIDE,
    mask_threshold: int = 0,
) -> dict:
    """The project's metrics (image / pixel AUROC, AUPRO, per defect type) of a reference output,
    the pixel ones at each image's own resolution (long side capped at ``pixel_max_side``), as
    the pipeline's evaluation measures the fused result and every scorer.

    ``test`` needs ``path``, ``gt_label``, ``defect_type`` and ``mask_path`` (the run's predictions.csv).
    """
    labels = test["gt_label"].to_numpy().astype(int)
    masks, has_mask = load_native_gt_masks(
        test["path"].tolist(), test["mask_path"].fillna("").tolist(), labels.tolist(), max_side=pixel_max_side,
        threshold=int(mask_threshold),
    )
    maps = ResizedMaps(output["anomaly_map"], [mask.shape for mask in masks])
    # No threshold: pred_label is a placeholder, and the metrics that need it are dropped below.
    frame = test.assign(pred_score=output["pred_score"], pred_label=0)
    metrics = evaluate_predictions(frame, maps, masks, has_mask, fpr_limit=float(fpr_limit))
    return {key: metrics[key] for key in REFERENCE_METRICS if key in metrics}


def reference_feature_config(params: dict[str, Any], image_size: int | Sequence[int]) -> FeatureConfig:
    """The memory-bank scorer's features from a run's parameters, built as the ``memory_bank``
    stage builds them (``memory_bank.features``, ``memory_bank.backbone`` or the project backbone)."""
    from fsad_pipeline.pipelines.training.nodes import feature_config

    bank = params["memory_bank"]
    return feature_config(bank.get("backbone") or params["backbone"], list(as_hw(image_size)), bank["features"])


def run_image_size(workdir: Path, params: dict[str, Any]) -> Any:
    """The size a finished run scored at: its metrics.json ``image_size``, else its resolved
    working size (data/02_intermediate/working_size.json), else the ``image_size`` parameter."""
    for relative in ("data/08_reporting/metrics.json", "data/02_intermediate/working_size.json"):
        path = Path(workdir) / relative
        if path.is_file():
            size = json.loads(path.read_text()).get("image_size")
            if size is not None:
                return size
    return params["image_size"]


def reference_for_run(
    workdir: str | Path, params: dict[str, Any], *, batch_size: int = 32, device: str = "cpu", progress: bool = True
) -> dict[str, Any]:
    """The plain reference on a finished run in ``workdir`` (a project folder), evaluated on the run's test images.

    Reads ``data/02_intermediate/support_selection.json`` (round 0, as the synthesis stage does),
    ``data/07_model_output/predictions.csv`` (the test images: path, gt_label, defect_type,
    mask_path) and the size the run used (:func:`run_image_size`). ``params`` are the run's
    parameters (backbone, memory_bank, data.max_pixels, evaluation.aupro_fpr_limit).
    """
    workdir = Path(workdir)

    def located(path: str) -> str:  # the run's relative paths are relative to its project folder
        return path if not path or Path(path).is_absolute() else str(workdir / path)

    selection = json.loads((workdir / "data" / "02_intermediate" / "support_selection.json").read_text())
    test = pd.read_csv(workdir / "data" / "07_model_output" / "predictions.csv", keep_default_na=False)
    test = test.assign(path=test["path"].map(located), mask_path=test["mask_path"].map(located))
    size = as_hw(run_image_size(workdir, params))
    max_pixels = (params.get("data") or {}).get("max_pixels")
    read = {} if max_pixels is None else {"max_pixels": int(max_pixels)}
    config = reference_feature_config(params, size)
    started = time.perf_counter()
    reference = PlainKnnReference(
        config, image_size=size, map_sigma=float(params["memory_bank"]["map_sigma"]), device=device
    ).fit(load_images([located(p) for p in selection["rounds"][0]], size, **read))
    paths = test["path"].tolist()
    output = score_in_chunks(
        reference, len(paths), lambda start, stop: load_images(paths[start:stop], size, **read), batch_size, progress
    )
    seconds = time.perf_counter() - started
    limit = float(params["evaluation"]["aupro_fpr_limit"])
    max_side = params["evaluation"].get("pixel_max_side", DEFAULT_PIXEL_MAX_SIDE)
    common = {"bank_size": reference.bank_size, "k_shot": len(selection["rounds"][0]), "image_size": list(size),
              "backbone": config.backbone, "seconds": seconds, "images_per_second": len(paths) / seconds if seconds else None}
    threshold = int((params.get("data") or {}).get("mask_threshold", 0))
    return {name: {**evaluate_reference(test, out, limit, max_side, threshold), **common} for name, out in output.items()}
