"""The tiny ``dfd`` run → ``promotion`` → ``inference`` pipeline and ``fsad-inspect`` on the champion."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from fsad_pipeline.console import EXIT_MODEL, EXIT_OK, inspect_main
from fsad_pipeline.model_store.bundle import BundleMismatchError
from fsad_pipeline.model_store.store import ModelStore, StoreError

pytestmark = pytest.mark.slow


def _by_name(frame: pd.DataFrame, root: str) -> pd.Series:
    """pred_score indexed by the path below ``root`` (the same image in the raw data and the inbox)."""
    return frame.set_index(frame["path"].str.split(root).str[-1])["pred_score"].sort_index()


def test_promoted_dfd_run_scores_new_images_like_the_run_itself(tiny_project, tmp_path, capsys):
    tiny_project.run("dfd")
    outputs = tiny_project.run("promotion")
    store = ModelStore(tiny_project.path("models"))
    champion = store.current()
    assert champion.version == "v0001" and outputs["promotion_record"].load()["version"] == "v0001"
    manifest = json.loads((store.champion_path / "bundle.json").read_text())
    metrics = json.loads(tiny_project.path("data/08_reporting/metrics.json").read_text())
    assert manifest["metrics"]["image_auroc"] == metrics["image_auroc"] and len(manifest["data_fingerprint"]) == 64
    assert manifest["image_size"] == [64, 64] and manifest["config_version"] == 1 and manifest["k_shot"] == 2
    # The tiny run fuses dfd + knn + gaussian; the bundle carries exactly those.
    assert set(manifest["scorers"]) == set(metrics["scorers"]) == {"dfd", "knn", "gaussian"}
    with pytest.raises(StoreError, match="already holds v0001"):
        tiny_project.run("promotion")  # a manual promotion never silently replaces the champion

    # New images arrive: the run's test images plus a corrupt file.
    inbox = tiny_project.path("data/inbox")
    shutil.copytree(tiny_project.path("data/01_raw/widget/test"), inbox)
    (inbox / "scratch" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    summary = tiny_project.run("inference")["inference_summary"].load()
    run = tiny_project.path("data/07_model_output/inference")
    predictions = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert summary["n_images"] == len(predictions) == 10 and summary["model_version"] == "v0001"
    assert pd.read_csv(run / "rejects.csv")["path"].str.endswith("zz_corrupt.png").tolist() == [True]
    assert len(list((run / "overlays").iterdir())) == 10
    # Inference reproduces the batch run's fused scores for the same files.
    batch = pd.read_csv(tiny_project.path("data/07_model_output/predictions.csv"), keep_default_na=False)
    np.testing.assert_allclose(_by_name(predictions, "inbox/").to_numpy(), _by_name(batch, "test/").to_numpy(),
                               rtol=1e-4, atol=1e-5)
    assert (predictions["pred_label"] == (predictions["pred_score"] >= metrics["threshold"]).astype(int)).all()

    # fsad-inspect in the project folder: the same champion, the same function, the same scores.
    out = tmp_path / "cli_run"
    assert inspect_main([str(inbox), "--out", str(out), "--quiet", "--batch-size", "4"]) == EXIT_OK
    line = capsys.readouterr().out.strip().splitlines()[-1]  # (Kedro's log handler from the runs above shares stdout)
    assert line.startswith("fsad-inspect: 10 images, ") and "1 unreadable" in line and "model v0001" in line
    np.testing.assert_allclose(pd.read_csv(out / "predictions.csv")["pred_score"], predictions["pred_score"], rtol=1e-6)

    # The configuration moves on (another image size): the old champion is refused, not misused.
    with pytest.raises(BundleMismatchError, match="image_size"):
        tiny_project.run("inference", params={"image_size": 128})
    tiny_project.set_params("parameters.yml", {"config_version": 2})
    assert inspect_main([str(inbox), "--out", str(tmp_path / "refused"), "--quiet"]) == EXIT_MODEL
    assert "config_version" in capsys.readouterr().err and not (tmp_path / "refused").exists()
