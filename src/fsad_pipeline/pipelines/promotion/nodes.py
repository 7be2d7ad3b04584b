"""Thin node over ``fsad_pipeline.model_store.store``: promote the current run's model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fsad_pipeline.classification.defect_types import DefectTypeClassifiers, bundle_component
from fsad_pipeline.data.manifest import manifest_fingerprint
from fsad_pipeline.model_store.champion_challenger import freeze_validation
from fsad_pipeline.model_store.store import ModelStore, export_and_promote
from fsad_pipeline.scoring.dfd_scorer import DFDScorer
from fsad_pipeline.scoring.patch_scorers import PatchScorerSet
from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet


def promote_model(
    dfd_model: DFDScorer,
    patch_scorers: PatchScorerSet,
    defect_classifier: DefectTypeClassifiers,
    fusion: dict,
    support_images: np.ndarray,
    metrics: dict,
    fusion_validation: PseudoAnomalySet,
    manifest: pd.DataFrame,
    config_version: int,
    winclip: dict,
    model_store: dict,
    promotion: dict,
) -> dict:
    """Bundle the run's models with its metrics and data fingerprint and make them the champion.

    No comparison happens here (that is the retraining job's decision): an existing champion
    is only replaced when ``promotion.replace_champion`` is true, and it stays in the store.
    The first promotion freezes this run's validation set as the store's comparison set for
    every later retraining (never replaced afterwards).
    """
    store = ModelStore(model_store["root"])
    entry = export_and_promote(
        store,
        {"kind": "manual", "reason": promotion["reason"], "image_auroc": metrics.get("image_auroc")},
        replace_champion=bool(promotion["replace_champion"]),
        dfd_model=dfd_model,
        patch_scorers=patch_scorers,
        classifier=bundle_component(defect_classifier),
        fusion=fusion,
        support_images=support_images,
        config_version=int(config_version),
        winclip=winclip,
        metrics=metrics,
        data_fingerprint=manifest_fingerprint(manifest),
    )
    frozen = freeze_validation(store.root, fusion_validation, source=f"the run promoted as {entry.version}")
    return {**entry.record, "path": str(entry.path), "froze_validation": frozen}
