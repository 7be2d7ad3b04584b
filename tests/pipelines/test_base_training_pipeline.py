"""End to end: base_training on two tiny generated categories, then dfd with the registered encoder."""

from __future__ import annotations

import json

import pytest

from fsad_pipeline.scoring.patch_scorers import PatchScorerSet

pytestmark = pytest.mark.slow

TINY_BASE_TRAINING = {
    "base_training": {
        "sources": [{"source": "mvtec", "root": "data/01_raw", "categories": None}],
        "images_per_category": 4,
        "validation_per_category": 2,
        "training": {
            "image_size": 64, "epochs": 1, "batch_size": 4, "views_per_image": 2, "progress": False,
            "validation": {"support_images": 2, "anomalies_per_image": 1, "foreground": "none", "feature_dim": 32},
        },
    }
}


def test_base_training_encoder_feeds_the_memory_bank_in_dfd(tiny_project, datasets):
    raw = tiny_project.path("data/01_raw")
    for seed, name in enumerate(("alpha", "beta"), start=5):
        datasets.mvtec_category(raw, name, n_train=6, n_test_good=2, defects={"spot": 2}, size=64, seed=seed)
    tiny_project.set_params("parameters_base_training.yml", TINY_BASE_TRAINING)

    tiny_project.run("base_training")
    split = json.loads(tiny_project.path("data/02_intermediate/base_split.json").read_text())
    assert split["target"] == "widget" and set(split["categories"]) == {"alpha", "beta"}
    paths = [p for parts in split["categories"].values() for ps in parts.values() for p in ps]
    assert paths and not any("/widget/" in p or "/test/" in p for p in paths)  # target and test images never used
    encoder_dir = tiny_project.path("data/06_models/encoders/base_stn")
    info = json.loads((encoder_dir / "encoder.json").read_text())
    assert info["name"] == "base_stn" and info["base_backbone"] == "efficientnet_lite0"
    assert info["training"]["target"] == "widget" and (encoder_dir / "encoder.safetensors").stat().st_size > 0
    history = json.loads(tiny_project.path("data/08_reporting/base_training.json").read_text())
    assert [h["meta_epoch"] for h in history["history"]] == [0, 1] and history["backbone"] == "registered:base_stn"
    assert tiny_project.path("data/08_reporting/base_training_curves.png").stat().st_size > 1000

    tiny_project.run("dfd", params={"memory_bank": {"backbone": "registered:base_stn"}})
    scorers = PatchScorerSet.load(tiny_project.path("data/06_models/patch_scorers"))
    assert scorers.features.backbone == "registered:base_stn"
    assert scorers.build_extractor().backbone.name == "registered:base_stn"
    metrics = json.loads(tiny_project.path("data/08_reporting/metrics.json").read_text())
    assert {"knn", "gaussian"} <= set(metrics["scorers"])
    assert 0.0 <= metrics["scorers"]["knn"]["image_auroc"] <= 1.0
    assert metrics["backbone"] == "efficientnet_lite0"  # DFD keeps the plain backbone
