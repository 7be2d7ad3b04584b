import json

import numpy as np
import pandas as pd
import pytest

from fsad_pipeline.artifacts import load_sample_set

pytestmark = pytest.mark.slow


def test_ingestion_and_synthesis_end_to_end(tiny_project):
    tiny_project.run(["ingestion", "synthesis"])
    manifest = pd.read_csv(tiny_project.path("data/02_intermediate/manifest.csv"), keep_default_na=False)
    assert len(manifest) == 5 + 4 + 6
    selection = json.loads(tiny_project.path("data/02_intermediate/support_selection.json").read_text())
    assert selection["k_shot"] == 2 and len(selection["rounds"][0]) == 2
    support = np.load(tiny_project.path("data/03_primary/support_images.npy"))
    assert support.shape == (2, 64, 64, 3)
    train = load_sample_set(tiny_project.path("data/05_model_input/pseudo_anomalies"))
    assert len(train) == 2 * 4 and train.images.shape == (8, 64, 64, 3)
    assert sorted(set(train.source_index.tolist())) == [0, 1]
    assert (train.labels == (train.masks.reshape(8, -1).max(1) > 0)).all()
    validation = load_sample_set(tiny_project.path("data/05_model_input/synthetic_validation"))
    assert len(validation) == 2 * 3
    assert not np.array_equal(validation.images[:3], train.images[:3])  # its own seed
    assert tiny_project.path("data/08_reporting/pseudo_anomaly_examples.png").stat().st_size > 1000
    rejects = pd.read_csv(tiny_project.path("data/08_reporting/ingestion_rejects.csv"))
    assert rejects.empty


def test_same_seed_same_samples(tiny_project):
    tiny_project.run(["ingestion", "synthesis"])
    first = load_sample_set(tiny_project.path("data/05_model_input/pseudo_anomalies"))
    tiny_project.run(["ingestion", "synthesis"])
    second = load_sample_set(tiny_project.path("data/05_model_input/pseudo_anomalies"))
    assert np.array_equal(first.images, second.images) and np.array_equal(first.masks, second.masks)


def test_bad_image_is_reported_and_run_goes_on(tiny_project):
    bad = tiny_project.path("data/01_raw/widget/test/good/broken.png")
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    tiny_project.run("ingestion")
    rejects = pd.read_csv(tiny_project.path("data/08_reporting/ingestion_rejects.csv"))
    assert rejects["path"].str.endswith("broken.png").tolist() == [True]


def test_k_too_large_fails_clearly(tiny_project):
    with pytest.raises(Exception, match="k_shot=50 but only 5 good training image"):
        tiny_project.run("ingestion", params={"k_shot": 50})


def test_a_failed_ingestion_leaves_the_previous_outputs_matching(tiny_project):
    """Issue 18, defect 2: the manifest was saved before the k_shot check failed, so manifest.csv
    and support_selection.json described different drops."""
    tiny_project.run("ingestion")
    outputs = [tiny_project.path(f"data/02_intermediate/{name}") for name in ("manifest.csv", "support_selection.json")]
    before = [path.read_bytes() for path in outputs]
    new_good = tiny_project.path("data/01_raw/widget/train/good/zz_new.png")
    new_good.write_bytes(tiny_project.path("data/01_raw/widget/train/good").glob("*.png").__next__().read_bytes())
    with pytest.raises(Exception, match="k_shot=50 but only 6 good training image"):
        tiny_project.run("ingestion", params={"k_shot": 50})
    assert [path.read_bytes() for path in outputs] == before


def test_registry_lists_the_stages(tiny_project):
    from kedro.framework.project import pipelines
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(tiny_project.root)
    assert {"ingestion", "synthesis", "dfd", "__default__"} <= set(pipelines)
