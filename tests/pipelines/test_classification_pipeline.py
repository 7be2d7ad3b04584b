import json

import numpy as np
import pandas as pd
import pytest

from fsad_pipeline.classification.defect_types import METHODS, load_defect_classifier
from fsad_pipeline.data.sampling import load_images

pytestmark = pytest.mark.slow


def test_defect_types_in_the_dfd_chain(tiny_project):
    # PatchCore kNN scoring: with the cosine / top-1 % default the 6 tiny test images still rank
    # perfectly (image AUROC 1.0) but the f1_max threshold fitted on the 25 synthetic validation
    # samples lets 2 of the 4 goods through; this test is about the classify-defects gating.
    knn = {"distance": "euclidean", "image_score": "reweighted"}
    tiny_project.set_params("parameters_memory_bank.yml", {"memory_bank": {"knn": knn}})
    tiny_project.run("dfd", params={"k_defect_shots": 2, "classification.classify": "defects"})
    shots = json.loads(tiny_project.path("data/02_intermediate/defect_shots.json").read_text())["shots"]
    assert {k: len(v) for k, v in shots.items()} == {"scratch": 2, "spot": 2}
    table = pd.read_csv(tiny_project.path("data/07_model_output/defect_types.csv"), keep_default_na=False)
    # leakage guard: no labelled shot is ever classified or evaluated
    assert not set(sum(shots.values(), [])) & set(table["path"])
    defects = table[table["gt_label"] == 1]
    assert len(defects) == 2 and defects["classified"].astype(bool).all()
    # classify: defects -> exactly the images the verdict calls defective (a false alarm of the
    # tiny project's 2-image threshold calibration is classified too; a passed good image never)
    predictions = pd.read_csv(tiny_project.path("data/07_model_output/predictions.csv"))
    verdict = dict(zip(predictions["path"], predictions["pred_label"].astype(bool)))
    assert (table["classified"].astype(bool) == table["path"].map(verdict)).all()
    assert not table["path"].map(verdict).all()  # some good image passed, and was not classified
    for suffix in ("", "_residual_prototype", "_feature_prototype"):
        assert set(defects[f"pred_defect_type{suffix}"]) <= {"scratch", "spot", "unknown"}
        assert set(defects[f"runner_up_defect_type{suffix}"]) <= {"scratch", "spot"}
        probability = pd.to_numeric(defects[f"pred_defect_probability{suffix}"])  # empty where not classified
        assert ((probability >= 0.5) & (probability <= 1)).all()

    metrics = json.loads(tiny_project.path("data/08_reporting/metrics.json").read_text())["defect_type"]
    assert set(metrics["methods"]) == set(METHODS) and metrics["classified_defects"] == 2
    for name, values in metrics["methods"].items():
        assert 0.0 <= values["accuracy"] <= 1.0 and 0.0 <= values["closed_set_accuracy"] <= 1.0, name
        assert values["confusion"]["true"] == ["scratch", "spot"]
    assert metrics["accuracy"] == metrics["methods"]["classifier"]["accuracy"]
    assert tiny_project.path("data/08_reporting/defect_type_confusion.png").stat().st_size > 1000
    training = json.loads(tiny_project.path("data/08_reporting/classification_training.json").read_text())
    assert training["pretrain"]["steps"] == 3 and training["fine_tune"]["steps"] > 0
    report = tiny_project.path("data/08_reporting/report.html").read_text(encoding="utf-8")
    assert "Defect-type confusion" in report and "defect-type method" in report

    # the saved classifier reproduces the stage's predictions
    classifier = load_defect_classifier(tiny_project.path("data/06_models/defect_classifier"))
    again = classifier.predict(load_images(defects["path"].tolist(), 64))
    assert list(again["pred_defect_type"]) == defects["pred_defect_type"].tolist()
    np.testing.assert_allclose(again["pred_defect_probability"], pd.to_numeric(defects["pred_defect_probability"]), rtol=1e-5)
