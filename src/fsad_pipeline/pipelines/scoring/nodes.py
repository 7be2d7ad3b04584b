"""Thin nodes over ``fsad_pipeline.scoring``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fsad_pipeline.data.sampling import evaluation_set
from fsad_pipeline.scoring.batch import score_paths
from fsad_pipeline.scoring.dfd_scorer import DFDScorer


def score_test_images(
    manifest: pd.DataFrame, dfd_model: DFDScorer, data: dict, scoring: dict
) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """Per-image predictions (CSV), anomaly maps (.npy) and the scoring speed."""
    test = evaluation_set(manifest)
    result = score_paths(
        dfd_model,
        test["path"].tolist(),
        chunk_size=int(scoring["chunk_size"]),
        max_pixels=int(data["max_pixels"]),
    )
    predictions = pd.DataFrame(
        {
            "path": test["path"],
            "gt_label": test["label"].astype(int),
            "defect_type": test["defect_type"],
            "mask_path": test["mask_path"],
            "pred_score": result["pred_scores"],
            "pred_label": dfd_model.predict_label(result["pred_scores"]),
        }
    )
    timing = {
        "scored_images": len(test),
        "score_seconds": result["seconds"],
        "score_images_per_second": result["images_per_second"],
    }
    return predictions, result["anomaly_maps"], timing
