"""Thin nodes over ``fsad_pipeline.scoring.dfd_scorer``."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from fsad_pipeline.data.geometry import as_hw
from fsad_pipeline.evaluation.figures import training_history_figure
from fsad_pipeline.models.dfd_training import DFDTrainConfig
from fsad_pipeline.scoring.dfd_scorer import DFDScorer, FeatureConfig
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet


def feature_config(backbone: str, image_size: int | list | dict, features: dict) -> FeatureConfig:
    """``image_size``: the working size (an int, [H, W] or the ingestion's working-size record)."""
    return FeatureConfig.from_dict({**features, "backbone": backbone, "image_size": list(as_hw(image_size))})


def train_dfd_model(
    pseudo_anomalies: PseudoAnomalySet,
    synthetic_validation: PseudoAnomalySet,
    backbone: str,
    image_size: int,
    features: dict,
    dfd: dict,
    threshold: dict,
    seed: int,
    device: str,
) -> tuple[DFDScorer, list[dict], Figure]:
    # Deterministic on CPU: same seed + data -> same weights and scores.
    torch.use_deterministic_algorithms(True, warn_only=True)
    options = {key: value for key, value in dfd.items() if key not in ("cross_fit_folds", "cross_fit_scoring")}
    scorer = DFDScorer.fit(
        pseudo_anomalies,
        synthetic_validation,
        features=feature_config(backbone, image_size, features),
        train_config=DFDTrainConfig.from_dict({**options, "seed": int(seed)}),
        cross_fit_folds=dfd.get("cross_fit_folds"),
        cross_fit_scoring=dfd.get("cross_fit_scoring", "full"),
        threshold_method=threshold["method"],
        target_false_alarm_rate=float(threshold["target_false_alarm_rate"]),
        device=device,
    )
    return scorer, scorer.history, training_history_figure(scorer.history)
