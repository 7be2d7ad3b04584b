"""Normalising every scorer's output and fusing them, with weights chosen on validation data.

Each scorer's maps and image scores are min-max normalised with statistics taken from the
synthetic validation split (never the test set), then combined as a weighted sum. The weights
come from a Monte-Carlo search over uniformly drawn weight vectors (the anomalous-samples seed's
recipe), judged on the same validation split; when validation cannot tell the candidates apart
(one class only, or no candidate beats equal weights by ``min_gain``) equal weights are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fsad_pipeline.evaluation.metrics import image_auroc, pixel_auroc

logger = logging.getLogger(__name__)


@dataclass
class ScoreStats:
    """Min/max of one scorer's validation maps and image scores (frozen for inference)."""

    map_min: float
    map_max: float
    score_min: float
    score_max: float

    @classmethod
    def from_validation(cls, anomaly_maps: np.ndarray, pred_scores: np.ndarray) -> ScoreStats:
        maps = np.asarray(anomaly_maps, dtype=np.float32)
        scores = np.asarray(pred_scores, dtype=np.float64)
        return cls(float(maps.min()), float(maps.max()), float(scores.min()), float(scores.max()))

    def normalise_maps(self, maps: np.ndarray) -> np.ndarray:
        span = max(self.map_max - self.map_min, 1e-12)
        return (np.asarray(maps, dtype=np.float32) - self.map_min) / span

    def normalise_scores(self, scores: np.ndarray) -> np.ndarray:
        span = max(self.score_max - self.score_min, 1e-12)
        return (np.asarray(scores, dtype=np.float64) - self.score_min) / span

    def to_dict(self) -> dict:
        return {"map_min": self.map_min, "map_max": self.map_max, "score_min": self.score_min, "score_max": self.score_max}


@dataclass
class Fusion:
    """Per-scorer statistics and weights; ``fuse`` combines normalised outputs."""

    stats: dict[str, ScoreStats]
    weights: dict[str, float]
    search: dict = field(default_factory=dict)

    @property
    def scorers(self) -> list[str]:
        return list(self.weights)

    def fuse(self, outputs: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """``outputs[name] = {"anomaly_map", "pred_score"}`` → fused ``anomaly_map`` and ``pred_score``."""
        fused_map = None
        fused_score = None
        for name, weight in self.weights.items():
            maps = self.stats[name].normalise_maps(outputs[name]["anomaly_map"]) * weight
            scores = self.stats[name].normalise_scores(outputs[name]["pred_score"]) * weight
            fused_map = maps if fused_map is None else fused_map + maps
            fused_score = scores if fused_score is None else fused_score + scores
        return {"anomaly_map": fused_map, "pred_score": fused_score}

    def to_dict(self) -> dict:
        return {
            "weights": self.weights,
            "stats": {name: s.to_dict() for name, s in self.stats.items()},
            "search": self.search,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Fusion:
        return cls(
            stats={name: ScoreStats(**values) for name, values in data["stats"].items()},
            weights={name: float(w) for name, w in data["weights"].items()},
            search=data.get("search", {}),
        )


def _validation_objective(
    weights: np.ndarray,
    names: list[str],
    normalised: dict[str, dict[str, np.ndarray]],
    labels: np.ndarray,
    masks: np.ndarray | None,
    pixel_weight: float,
) -> float:
    scores = sum(w * normalised[n]["pred_score"] for w, n in zip(weights, names))
    objective = image_auroc(labels, scores)
    if masks is not None and pixel_weight > 0 and masks.any():
        maps = sum(w * normalised[n]["anomaly_map"] for w, n in zip(weights, names))
        objective += pixel_weight * pixel_auroc(masks, maps)
    return float(objective)


def fit_fusion(
    validation_outputs: Mapping[str, Mapping[str, np.ndarray]],
    labels: np.ndarray,
    masks: np.ndarray | None = None,
    *,
    mask_known: np.ndarray | None = None,
    n_trials: int = 200,
    seed: int = 0,
    min_gain: float = 0.005,
    pixel_weight: float = 0.0,
    search: bool = True,
) -> Fusion:
    """Statistics per scorer plus fusion weights from a Monte-Carlo search on validation outputs.

    ``validation_outputs[name] = {"anomaly_map": (N, H, W), "pred_score": (N,)}`` for the same N
    validation images; ``labels`` (N,) and optional ``masks`` (N, H, W). The objective is image
    AUROC (+ ``pixel_weight`` × pixel AUROC when masks are given, over the rows whose
    ``mask_known`` is True).
    """
    names = list(validation_outputs)
    if not names:
        raise ValueError("no scorer outputs to fuse")
    stats = {
        n: ScoreStats.from_validation(validation_outputs[n]["anomaly_map"], validation_outputs[n]["pred_score"])
        for n in names
    }
    equal = {n: 1.0 / len(names) for n in names}
    labels = np.asarray(labels).astype(int)
    if len(names) == 1 or not search or labels.min(initial=1) == labels.max(initial=0):
        reason = "single scorer" if len(names) == 1 else "search off" if not search else "single-class validation"
        return Fusion(stats, equal, {"method": "equal", "reason": reason})
    # The pixel term only sees rows with a known mask (a labelled defect without ground truth has none).
    pixel_rows = np.ones(len(labels), bool) if mask_known is None else np.asarray(mask_known, dtype=bool)
    if masks is not None:
        masks = np.asarray(masks)[pixel_rows]
    normalised = {
        n: {
            "pred_score": stats[n].normalise_scores(validation_outputs[n]["pred_score"]),
            "anomaly_map": (
                stats[n].normalise_maps(validation_outputs[n]["anomaly_map"][pixel_rows]) if pixel_weight > 0 else None
            ),
        }
        for n in names
    }
    equal_vector = np.full(len(names), 1.0 / len(names))
    baseline = _validation_objective(equal_vector, names, normalised, labels, masks, pixel_weight)
    rng = np.random.default_rng(seed)
    best_vector, best_value = equal_vector, baseline
    for _ in range(n_trials):
        candidate = rng.uniform(0.0, 1.0, size=len(names))
        candidate /= candidate.sum()
        value = _validation_objective(candidate, names, normalised, labels, masks, pixel_weight)
        if value > best_value:
            best_vector, best_value = candidate, value
    if best_value - baseline < min_gain:
        logger.info("fusion: no weighting beats equal weights by %.3f on validation; keeping equal weights", min_gain)
        return Fusion(stats, equal, {"method": "equal", "reason": "no gain", "validation_objective": baseline})
    weights = {n: float(w) for n, w in zip(names, best_vector)}
    logger.info("fusion weights %s (validation objective %.3f vs %.3f equal)", weights, best_value, baseline)
    return Fusion(
        stats,
        weights,
        {"method": "monte_carlo", "trials": n_trials, "validation_objective": best_value, "equal_objective": baseline},
    )
