import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from fsad_pipeline.data.geometry import fit_to_size
from fsad_pipeline.data.images import read_image
from fsad_pipeline.inspection.inspector import NoImagesError, collect_image_paths, inspect_images, run_inspection
from fsad_pipeline.model_store.bundle import BundleMismatchError, export_bundle, load_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_model_parts):
    target = tmp_path_factory.mktemp("inference") / "bundle"
    export_bundle(target, config_version=1, **{k: v for k, v in tiny_model_parts.items() if k != "image_size"})
    return target


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir, device="cpu")


def _texture(seed, height=48, width=48):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 0.5 + 0.25 * np.sin(xx * 0.8) * np.sin(yy * 0.8)
    return np.clip((base[..., None] + rng.normal(0, 0.03, (height, width, 3))) * 255, 0, 255).astype(np.uint8)


@pytest.fixture
def inbox(tmp_path, datasets):
    folder = tmp_path / "inbox"
    datasets.write_image(folder / "a_good.png", _texture(0))
    defect = _texture(1)
    defect[10:30, 12:30] = (240, 240, 20)
    datasets.write_image(folder / "b_defect.png", defect)
    datasets.write_image(folder / "line2" / "c_wide.png", _texture(2, 40, 80))  # nested, not square
    (folder / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "e_empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, not an input")
    return folder


def test_collect_image_paths_expands_folders_and_reports_missing_inputs(inbox, tmp_path):
    paths, rejects = collect_image_paths([inbox, inbox / "a_good.png", tmp_path / "missing.png"])
    names = [p.split("/")[-1] for p in paths]
    assert names == ["a_good.png", "b_defect.png", "d_corrupt.png", "e_empty.png", "c_wide.png"]
    assert rejects == [{"path": str(tmp_path / "missing.png"), "reason": "does not exist"}]
    assert [p.split("/")[-1] for p in collect_image_paths(inbox, recursive=False)[0]] == names[:4]
    # Neither an earlier run's overlays inside the inbox nor hidden folders are new images.
    shutil.copytree(inbox / "line2", inbox / "results" / "overlays")
    shutil.copytree(inbox / "line2", inbox / ".staging")
    assert [p.split("/")[-1] for p in collect_image_paths(inbox, exclude=inbox / "results")[0]] == names
    # A category folder's masks (MVTec ground_truth/, folder-drop masks/) are annotations, not parts;
    # a folder named directly is still searched, and a mask named directly is still taken.
    shutil.copytree(inbox / "line2", inbox / "ground_truth" / "crack")
    shutil.copytree(inbox / "line2", inbox / "masks" / "crack")
    assert [p.split("/")[-1] for p in collect_image_paths(inbox, exclude=inbox / "results")[0]] == names
    assert len(collect_image_paths(inbox / "masks")[0]) == 1


def test_every_readable_image_is_scored_and_the_unreadable_ones_listed(bundle, inbox, tmp_path):
    result = inspect_images(bundle, [inbox], tmp_path / "run", batch_size=2, progress=False)
    out = tmp_path / "run"
    predictions = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert [p.split("/")[-1] for p in predictions["path"]] == ["a_good.png", "b_defect.png", "c_wide.png"]
    rejects = pd.read_csv(out / "rejects.csv")
    assert [p.split("/")[-1] for p in rejects["path"]] == ["d_corrupt.png", "e_empty.png"]
    assert "zero-byte" in rejects["reason"].iloc[1] and "cannot decode" in rejects["reason"].iloc[0]

    # Scores are exactly what the bundle's ensemble gives for the same images fitted to its size
    # (c_wide.png keeps its aspect: centre-cropped, not squeezed).
    images = np.stack([fit_to_size(read_image(p), 32) for p in predictions["path"]])
    expected = bundle.ensemble().score(images)
    np.testing.assert_allclose(predictions["pred_score"], expected["pred_score"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(predictions["score_knn"], expected["per_scorer"]["knn"]["pred_score"], rtol=1e-6)
    threshold = bundle.threshold["threshold"]
    assert (predictions["pred_label"] == (predictions["pred_score"] >= threshold)).all()
    assert set(predictions["verdict"]) <= {"OK", "NG"} and (predictions["threshold"] == threshold).all()
    assert (predictions["verdict"] == predictions["pred_label"].map({0: "OK", 1: "NG"})).all()

    overlay = cv2.imread(str(out / predictions["overlay"].iloc[2]))
    assert overlay.shape == (40, 80, 3)  # the file's own aspect ratio
    assert predictions[["width", "height"]].iloc[2].tolist() == [80, 40]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 3 and summary["n_rejected"] == 2 and summary["threshold_source"] == "model"
    assert summary["n_ng"] + summary["n_ok"] == 3 and summary["images_per_second"] > 0
    assert result.summary["n_ng"] == int(predictions["pred_label"].sum())


def test_threshold_override_and_rerun_replaces_the_run_folder(bundle, inbox, tmp_path):
    out = tmp_path / "run"
    everything = inspect_images(bundle, inbox, out, threshold=-1e9, progress=False, overlays=False)
    assert everything.summary["n_ng"] == 3 and everything.summary["threshold_source"] == "override"
    assert not (out / "overlays").exists()
    nothing = inspect_images(bundle, [inbox / "a_good.png"], out, threshold=1e9, progress=False)
    assert nothing.summary["n_ng"] == 0 and len(pd.read_csv(out / "predictions.csv")) == 1
    assert len(list((out / "overlays").iterdir())) == 1
    with pytest.raises(ValueError, match="finite"):
        inspect_images(bundle, inbox, out, threshold=float("nan"), progress=False)


def test_refuses_to_overwrite_a_foreign_folder(bundle, inbox, tmp_path):
    foreign = tmp_path / "my_documents"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(ValueError, match="not an earlier inspection output"):
        inspect_images(bundle, inbox, foreign, progress=False)
    assert (foreign / "thesis.txt").read_text() == "precious"


def test_no_images_at_all_or_none_readable(bundle, inbox, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoImagesError, match="no image files"):
        inspect_images(bundle, tmp_path / "empty", tmp_path / "run", progress=False)
    with pytest.raises(NoImagesError, match="none of the 2"):
        inspect_images(bundle, [inbox / "d_corrupt.png", inbox / "e_empty.png"], tmp_path / "run", progress=False)
    assert len(pd.read_csv(tmp_path / "run" / "rejects.csv")) == 2  # still listed


def test_run_inspection_checks_the_model_before_loading_it(bundle_dir, inbox, tmp_path):
    with pytest.raises(BundleMismatchError, match="image_size"):
        run_inspection(bundle_dir, inbox, tmp_path / "run", expect={"image_size": 256}, device="cpu")
    with pytest.raises(NoImagesError):
        run_inspection(tmp_path / "no_model", tmp_path / "nothing_here", tmp_path / "run")


class _Classifier:
    def predict(self, images, anomaly_maps):
        assert images.shape[1:] == (32, 32, 3) and anomaly_maps.shape[1:] == (32, 32)
        n = len(images)
        return {"pred_defect_type": np.array(["spot"] * n), "pred_defect_probability": np.full(n, 0.8),
                "runner_up_defect_type": np.array(["scratch"] * n)}


def test_defect_type_columns_when_the_bundle_has_a_classifier(bundle, inbox, tmp_path):
    scores = inspect_images(bundle, inbox, tmp_path / "probe", progress=False, overlays=False).predictions["pred_score"]
    middle = float(np.sort(scores)[1])  # one OK, two NG
    bundle.classifier = _Classifier()
    try:
        result = inspect_images(bundle, inbox, tmp_path / "run", threshold=middle, batch_size=2, progress=False)
    finally:
        bundle.classifier = None
    table = pd.read_csv(tmp_path / "run" / "predictions.csv", keep_default_na=False)
    flagged = table["verdict"] == "NG"
    assert flagged.sum() == 2 and result.summary["classifier"] is True
    assert (table.loc[flagged, "pred_defect_type"] == "spot").all()
    assert (table.loc[flagged, "runner_up_defect_type"] == "scratch").all()
    assert (table.loc[flagged, "pred_defect_probability"].astype(float) == 0.8).all()
    assert (table.loc[~flagged, "pred_defect_type"] == "").all()


def test_a_failed_inspection_leaves_the_earlier_results_intact(bundle, inbox, tmp_path):
    """Issue 18, defect 1: the output folder was replaced before the run found no readable image."""
    out = tmp_path / "run"
    first = inspect_images(bundle, inbox / "a_good.png", out, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert first.summary["n_images"] == 1 and before
    with pytest.raises(NoImagesError, match="left as they were") as error:
        inspect_images(bundle, [inbox / "d_corrupt.png", inbox / "e_empty.png"], out, progress=False)
    assert "e_empty.png: zero-byte file" in str(error.value)  # the reasons are in the message
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]  # no staging left behind


def test_a_missing_input_path_is_named_as_missing(bundle, tmp_path):
    """Issue 18, defect 10: a path that does not exist was reported as "no image files found"."""
    with pytest.raises(NoImagesError, match=r"path does not exist: .*no_such_folder") as error:
        inspect_images(bundle, tmp_path / "no_such_folder", tmp_path / "run", progress=False)
    assert "no image files found" not in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoImagesError, match=r"paths do not exist: .*a, .*b; no image files found in .*empty"):
        inspect_images(bundle, [tmp_path / "a", tmp_path / "b", tmp_path / "empty"], tmp_path / "run", progress=False)


def test_quiet_inspection_shows_no_progress_bars_and_a_loud_one_only_its_own(bundle, inbox, tmp_path, capsys):
    """Issue 18, defect 10: a bank fitted with progress bars kept printing them under --quiet.
    Scored a chunk at a time, a bank never shows its own search bar: the inspection's bar covers it."""
    knn = bundle.patch_scorers.scorers["knn"]
    knn.set_progress(True)  # as a bank fitted by a pipeline run with progress on is saved
    capsys.readouterr()
    inspect_images(bundle, inbox / "a_good.png", tmp_path / "quiet", progress=False)
    assert "kNN" not in capsys.readouterr().err
    inspect_images(bundle, inbox / "a_good.png", tmp_path / "loud", progress=True)
    err = capsys.readouterr().err
    assert "inspecting" in err and "kNN" not in err


def test_an_inspection_logs_its_count_and_output_folder(bundle, inbox, tmp_path, caplog):
    """Issue 18, defect 10: the inference pipeline's log gave no count or output path."""
    import logging

    with caplog.at_level(logging.INFO, logger="fsad_pipeline.inspection.inspector"):
        inspect_images(bundle, inbox, tmp_path / "run", progress=False)
    (line,) = [r.getMessage() for r in caplog.records if "inspected" in r.getMessage()]
    assert "inspected 3 image(s)" in line and "2 rejected" in line and str(tmp_path / "run") in line


def test_an_inspection_writes_a_self_contained_report(bundle, inbox, tmp_path):
    """Issue 18, defect 11: the README promised an inference report; only summary.json was written."""
    result = inspect_images(bundle, inbox, tmp_path / "run", progress=False)
    page = (tmp_path / "run" / "report.html").read_text()
    assert result.summary["files"]["report"] == "report.html"
    assert page.count('class="image-row"') == 3 and "inference run" in page and "data:image/jpeg;base64," in page
    inspect_images(bundle, inbox, tmp_path / "plain", report=False, progress=False)
    assert not (tmp_path / "plain" / "report.html").exists()
