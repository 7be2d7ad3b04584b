"""Every available scorer behind one call, with backbone features computed once per batch.

Patch-feature scorers (memory-bank kNN, per-position Gaussian, anomalous bank) share one
extractor: the images go through the backbone once and each scorer reads the same features.
DFD (its own dual-path features) and WinCLIP (its own CLIP model) score images directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fsad_pipeline.data.geometry import as_hw
from fsad_pipeline.models.features import PatchFeatureExtractor, extract_features
from fsad_pipeline.scoring.base import ScoreBatch, Scorer
from fsad_pipeline.scoring.fusion import Fusion
from fsad_pipeline.scoring.patch_scorers import score_patch_features


#: The patch scorers' map smoothing (pixels) where a saved set does not record its own.
DEFAULT_MAP_SIGMA = 4.0


class PatchScorer(Protocol):
    name: str

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor: ...

    def image_scores(self, features: torch.Tensor, patch_scores: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass
class ScorerEnsemble:
    """``image_scorers`` score images; ``patch_scorers`` score the shared ``extractor``'s features."""

    image_size: tuple[int, int]
    image_scorers: dict[str, Scorer] = field(default_factory=dict)
    patch_scorers: dict[str, PatchScorer] = field(default_factory=dict)
    extractor: PatchFeatureExtractor | None = None
    feature_batch_size: int = 16
    map_sigma: float = 4.0
    fusion: Fusion | None = None
    device: str = "cpu"
    name: str = "fused"

    def score_each(self, images: np.ndarray) -> dict[str, ScoreBatch]:
        """Every scorer's own (un-normalised) output for a batch of uint8 RGB images."""
        outputs: dict[str, ScoreBatch] = {name: s.score(images) for name, s in self.image_scorers.items()}
        if self.patch_scorers:
            if self.extractor is None:
                raise ValueError("patch scorers need a feature extractor")
            features = extract_features(
                self.extractor,
                images,
                image_size=self.image_size,
                batch_size=self.feature_batch_size,
                device=self.device,
                dual_path=False,
                progress=False,
            )
            outputs.update(score_patch_features(self.patch_scorers, features, self.image_size, self.map_sigma))
        return outputs

    def score(self, images: np.ndarray) -> ScoreBatch:
        """Fused output (needs ``fusion``); the per-scorer outputs ride along under their names."""
        outputs = self.score_each(images)
        if self.fusion is None:
            raise ValueError("the ensemble has no fusion yet: call fit_fusion on validation outputs")
        fused = self.fusion.fuse(outputs)
        return {**fused, "per_scorer": outputs}  # type: ignore[typeddict-unknown-key]


def stack_outputs(chunks: list[Mapping[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """Concatenate per-chunk ``score_each`` results along the image axis."""
    names = list(chunks[0]) if chunks else []
    return {
        name: {
            "anomaly_map": np.concatenate([c[name]["anomaly_map"] for c in chunks]),
            "pred_score": np.concatenate([c[name]["pred_score"] for c in chunks]),
        }
        for name in names
    }


def build_winclip(support_images: np.ndarray, winclip: Mapping[str, Any], *, device: str = "cpu") -> Scorer | None:
    """The WinCLIP scorer with the supports as few-shot references, or None without a checkpoint."""
    import logging

    from fsad_pipeline.models.winclip import ClipWeightsUnavailable, WinClipScorer, load_clip_model

    if not winclip.get("enabled", True):
        return None
    try:
        model, tokenizer, *_ = load_clip_model(winclip["model_name"], winclip.get("checkpoint_path"), device=device)
    except ClipWeightsUnavailable as error:
        logging.getLogger(__name__).info("WinCLIP scorer skipped: %s", error)
        return None
    scorer = WinClipScorer(model, tokenizer, class_name=winclip.get("class_name") or "object", device=device)
    if winclip.get("few_shot", True):
        scorer.fit(support_images)
    return scorer


def assemble(
    dfd_model: Scorer | None,
    patch_scorer_set: Any | None,
    *,
    image_size: int | tuple[int, int],
    winclip_scorer: Scorer | None = None,
    map_sigma: float | None = None,
    device: str = "cpu",
    fusion: Fusion | None = None,
) -> ScorerEnsemble:
    """Every scorer behind one call. ``map_sigma`` smooths the patch scorers' maps: None takes the
    value the patch scorers were fitted (and their validation maps made) with, recorded in the
    set's ``info`` (4.0 for sets saved before it was recorded). DFD smooths its own maps."""
    image_scorers: dict[str, Scorer] = {}
    if dfd_model is not None:
        image_scorers["dfd"] = dfd_model
    if winclip_scorer is not None:
        image_scorers["winclip"] = winclip_scorer
    patch = dict(patch_scorer_set.scorers) if patch_scorer_set is not None else {}
    for scorer in patch.values():
        # Scored a chunk at a time, under the caller's own progress bar (or none, in the service):
        # a bank's search bar per chunk would only repeat it (a saved bank keeps its fit-time setting).
        if hasattr(scorer, "set_progress"):
            scorer.set_progress(False)
    if map_sigma is None:
        map_sigma = float((getattr(patch_scorer_set, "info", None) or {}).get("map_sigma", DEFAULT_MAP_SIGMA))
    return ScorerEnsemble(
        image_size=as_hw(image_size),
        image_scorers=image_scorers,
        patch_scorers=patch,
        extractor=patch_scorer_set.build_extractor() if patch else None,
        feature_batch_size=patch_scorer_set.features.batch_size if patch else 16,
        map_sigma=map_sigma,
        fusion=fusion,
        device=device,
    )


def score_in_chunks(
    ensemble: ScorerEnsemble, images: np.ndarray, *, chunk_size: int = 32, progress: bool = True
) -> dict[str, dict[str, np.ndarray]]:
    """``score_each`` over an in-memory image array, chunked."""
    from tqdm.auto import tqdm

    starts = range(0, len(images), chunk_size)
    names = "+".join([*ensemble.image_scorers, *ensemble.patch_scorers]) or "scorers"
    chunks = [
        ensemble.score_each(images[i : i + chunk_size])
        for i in tqdm(starts, desc=f"{names} (validation)", unit="batch", disable=not progress or len(starts) < 2)
    ]
    return stack_outputs(chunks)
