import json

import numpy as np
import pandas as pd
import pytest

from fsad_pipeline.data.sampling import load_images
from fsad_pipeline.scoring.dfd_scorer import DFDScorer

pytestmark = pytest.mark.slow


def test_dfd_chain_end_to_end(tiny_project):
    tiny_project.run("dfd")
    metrics = json.loads(tiny_project.path("data/08_reporting/metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold", "k_shot", "seed", "backbone",
                "train_seconds", "score_images_per_second"):
        assert key in metrics, key
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert metrics["k_shot"] == 2 and metrics["backbone"] == "efficientnet_lite0"
    predictions = pd.read_csv(tiny_project.path("data/07_model_output/predictions.csv"), keep_default_na=False)
    assert list(predictions.columns[:6]) == ["path", "gt_label", "defect_type", "mask_path", "pred_score", "pred_label"]
    assert len(predictions) == 4 + 6
    maps = np.load(tiny_project.path("data/07_model_output/anomaly_maps.npy"))
    assert maps.shape == (10, 64, 64)
    for figure in ("roc_curve.png", "score_histogram.png", "anomaly_overlays.png", "training_curves.png"):
        assert tiny_project.path(f"data/08_reporting/{figure}").stat().st_size > 1000, figure

    # The saved model reproduces the scores exactly.
    scorer = DFDScorer.load(tiny_project.path("data/06_models/dfd"), device="cpu")
    images = load_images(predictions["path"].tolist(), 64)
    again = scorer.score(images)["pred_score"]
    np.testing.assert_allclose(again, predictions["pred_score"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_training_is_deterministic(tiny_project):
    tiny_project.run(["ingestion", "synthesis", "training", "scoring"])
    first = pd.read_csv(tiny_project.path("data/07_model_output/predictions.csv"))["pred_score"].to_numpy()
    tiny_project.run(["training", "scoring"])
    second = pd.read_csv(tiny_project.path("data/07_model_output/predictions.csv"))["pred_score"].to_numpy()
    np.testing.assert_array_equal(first, second)
