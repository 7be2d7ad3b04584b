import json

import numpy as np
import pandas as pd
import pytest

from fsad_pipeline.artifacts import load_sample_set
from fsad_pipeline.data.sampling import load_images
from fsad_pipeline.scoring.dfd_scorer import DFDScorer
from fsad_pipeline.scoring.ensemble import assemble
from fsad_pipeline.scoring.fusion import Fusion
from fsad_pipeline.scoring.patch_scorers import PatchScorerSet

pytestmark = pytest.mark.slow


def test_dfd_chain_end_to_end(tiny_project):
    tiny_project.run("dfd")
    timings = json.loads(tiny_project.path("data/08_reporting/node_timings.json").read_text())  # NodeTimingHooks
    assert timings["pipeline"] == "dfd" and len(timings["nodes"]) > 10 and timings["total_seconds"] > 0
    metrics = json.loads(tiny_project.path("data/08_reporting/metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold", "k_shot", "seed", "backbone",
                "train_seconds", "score_images_per_second"):
        assert key in metrics, key
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert metrics["k_shot"] == 2 and metrics["backbone"] == "efficientnet_lite0"
    assert set(metrics["scorers"]) == {"dfd", "knn", "gaussian"}  # no CLIP checkpoint, no defect shots
    for name, scorer in metrics["scorers"].items():
        assert 0.0 <= scorer["image_auroc"] <= 1.0 and 0.0 <= scorer["pixel_auroc"] <= 1.0, name
    assert abs(sum(metrics["fusion_weights"].values()) - 1.0) < 1e-6
    # dfd.fusion_weights auto: the validation chose each of the DFD's map and image-score mixes.
    assert metrics["dfd_path_weights"]  # one entry per DFD member
    for weights in metrics["dfd_path_weights"]:
        assert weights["map"] in ([0.5, 0.5], [1.0, 0.0]) and weights["score"] in ([0.5, 0.5], [1.0, 0.0])
    predictions = pd.read_csv(tiny_project.path("data/07_model_output/predictions.csv"), keep_default_na=False)
    assert list(predictions.columns[:6]) == ["path", "gt_label", "defect_type", "mask_path", "pred_score", "pred_label"]
    assert {"score_dfd", "score_knn", "score_gaussian"} <= set(predictions.columns)
    assert len(predictions) == 4 + 6
    maps = np.load(tiny_project.path("data/07_model_output/anomaly_maps.npy"))
    assert maps.shape == (10, 64, 64)
    assert np.load(tiny_project.path("data/07_model_output/scorer_maps.npy")).shape == (3, 10, 64, 64)
    for figure in ("roc_curve.png", "score_histogram.png", "anomaly_overlays.png", "training_curves.png",
                   "scorer_comparison.png"):
        assert tiny_project.path(f"data/08_reporting/{figure}").stat().st_size > 1000, figure
    assert tiny_project.path("data/08_reporting/pr_curve.png").stat().st_size > 1000
    report = tiny_project.path("data/08_reporting/report.html").read_text(encoding="utf-8")
    assert len(report) > 20_000 and report.count('<tr class="image-row') == len(predictions)
    assert report.count("data:image/jpeg;base64,") == 2 * len(predictions)  # thumbnail + overlay per image
    assert report.count("data:image/png;base64,") == 4  # ROC, PR, histogram, scorer comparison

    # The saved models reproduce the scores exactly.
    images = load_images(predictions["path"].tolist(), 64)
    scorer = DFDScorer.load(tiny_project.path("data/06_models/dfd"), device="cpu")
    again = scorer.score(images)["pred_score"]
    np.testing.assert_allclose(again, predictions["score_dfd"].to_numpy(), rtol=1e-5, atol=1e-6)
    fusion = json.loads(tiny_project.path("data/06_models/fusion.json").read_text())
    ensemble = assemble(scorer, PatchScorerSet.load(tiny_project.path("data/06_models/patch_scorers")),
                        image_size=64, fusion=Fusion.from_dict(fusion))
    fused = ensemble.score(images)
    np.testing.assert_allclose(fused["pred_score"], predictions["pred_score"].to_numpy(), rtol=1e-4, atol=1e-5)


def test_labelled_defect_shots_feed_the_anomalous_bank(tiny_project):
    tiny_project.run("dfd", params={"k_defect_shots": 1})
    metrics = json.loads(tiny_project.path("data/08_reporting/metrics.json").read_text())
    assert "anomalous_bank" in metrics["scorers"]
    shots = json.loads(tiny_project.path("data/02_intermediate/defect_shots.json").read_text())["shots"]
    assert {k: len(v) for k, v in shots.items()} == {"scratch": 1, "spot": 1}
    predictions = pd.read_csv(tiny_project.path("data/07_model_output/predictions.csv"), keep_default_na=False)
    assert not set(sum(shots.values(), [])) & set(predictions["path"])  # never evaluated on its own shots
    assert len(predictions) == 10 - 2
    # Augmented views of the two shots join the fusion validation (5 default views each).
    fusion = json.loads(tiny_project.path("data/06_models/fusion.json").read_text())
    assert fusion["validation"]["validation_defect_views"] == 2 * 5
    assert len(np.load(tiny_project.path("data/07_model_output/patch_validation.npz"))["knn/pred_score"]) == \
        fusion["validation"]["validation_images"]


def test_training_is_deterministic(tiny_project):
    tiny_project.run(["ingestion", "synthesis", "training", "memory_bank", "scoring"])
    first = pd.read_csv(tiny_project.path("data/07_model_output/predictions.csv"))["pred_score"].to_numpy()
    tiny_project.run(["training", "scoring"])
    second = pd.read_csv(tiny_project.path("data/07_model_output/predictions.csv"))["pred_score"].to_numpy()
    np.testing.assert_array_equal(first, second)


def test_validation_made_from_unseen_good_images(tiny_project):
    """With enough unseen good images in the pool the validation is made from them: one DFD
    model (no cross-fit), every scorer scores the split as new images, its good images are the
    fusion's unseen normals, and labelled defect views still join it."""
    tiny_project.set_params("parameters_synthesis.yml", {"synthesis": {"validation": {"min_unseen_images": 1}}})
    tiny_project.run("dfd", params={"k_defect_shots": 1})
    base = np.load(tiny_project.path("data/03_primary/validation_images.npy"))
    assert base.shape == (1, 64, 64, 3)  # 5 pool images - 2 supports = 3 unseen; the fusion's third: 1
    validation = load_sample_set(tiny_project.path("data/05_model_input/synthetic_validation"))
    assert validation.from_unseen.all() and validation.labels.tolist() == [0, 1, 1]
    np.testing.assert_array_equal(validation.images[0], base[0])
    scorer = json.loads(tiny_project.path("data/06_models/dfd/scorer.json").read_text())
    assert len(scorer["members"]) == 1 and scorer["members"][0]["held_out"] == []
    fusion = json.loads(tiny_project.path("data/06_models/fusion.json").read_text())["validation"]
    assert fusion["validation_unseen_normals"] == 1 and fusion["validation_images"] == 3 + 2 * 5
    assert all(fusion["held_out_normals"].values())
