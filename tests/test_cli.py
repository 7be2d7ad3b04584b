"""fsad-inspect: exit statuses, messages and outputs, on a tiny real bundle (see tests/conftest.py).

The same command on a bundle promoted from the tiny ``dfd`` run is exercised end to end in
tests/pipelines/test_inference_pipeline.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from fsad_pipeline.console import EXIT_MODEL, EXIT_NO_IMAGES, EXIT_OK, EXIT_USAGE, inspect_main
from fsad_pipeline.model_store.bundle import export_bundle
from fsad_pipeline.model_store.store import ModelStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_model_parts):
    target = tmp_path_factory.mktemp("cli") / "bundle"
    export_bundle(target, config_version=1, **{k: v for k, v in tiny_model_parts.items() if k != "image_size"})
    return target


@pytest.fixture
def inbox(tmp_path, datasets):
    folder = tmp_path / "inbox"
    rng = np.random.default_rng(0)
    for i in range(3):
        datasets.write_image(folder / f"img{i}.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a folder that is not a project (no conf): no defaults, no expectations."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _project(root: Path, **params) -> Path:
    base = root / "conf" / "base"
    base.mkdir(parents=True)
    project = {"backbone": "efficientnet_lite0", "image_size": 32, "config_version": 1, "device": "cpu",
               "data": {"max_pixels": 1_000_000}}
    project.update(params)
    (base / "parameters.yml").write_text(yaml.safe_dump(project))
    inference = {"inference": {"model_dir": "models/champion", "output_dir": "out/inspection", "threshold": None,
                               "batch_size": 2, "recursive": True, "overlays": True, "overlay_max_side": 64,
                               "overlay_alpha": 0.5}}
    (base / "parameters_inference.yml").write_text(yaml.safe_dump(inference))
    return root


def test_fsad_inspect_is_a_registered_console_script():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fsad-inspect"] == "fsad_pipeline.console:inspect_main"


def test_scores_a_folder_and_lists_the_unreadable_file(bundle_dir, inbox, elsewhere, capsys):
    out = elsewhere / "run"
    code = inspect_main([str(inbox), "--model", str(bundle_dir), "--out", str(out), "--batch-size", "2", "--quiet"])
    # One summary line (a Kedro run earlier in this process may have left its log handler on stdout).
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fsad-inspect:")]
    assert code == EXIT_OK and len(lines) == 1
    stdout = lines[0]
    assert stdout.startswith("fsad-inspect: 3 images, ")
    assert "1 unreadable" in stdout and "img/s" in stdout and str(out / "predictions.csv") in stdout
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 3 and len(list((out / "overlays").iterdir())) == 3
    assert pd.read_csv(out / "rejects.csv")["path"].str.endswith("broken.png").tolist() == [True]


def test_threshold_flag_overrides_the_model(bundle_dir, inbox, elsewhere, capsys):
    assert inspect_main([str(inbox / "img0.png"), "--model", str(bundle_dir), "--threshold=-1e9", "--quiet",
                         "--no-overlays"]) == EXIT_OK
    assert "fsad-inspect: 1 images, 1 NG" in capsys.readouterr().out
    assert pd.read_csv(elsewhere / "inspection" / "predictions.csv")["verdict"].tolist() == ["NG"]


def test_missing_model_fails_with_a_clear_message(inbox, elsewhere, capsys):
    assert inspect_main([str(inbox), "--quiet"]) == EXIT_MODEL
    assert "no model at models/champion" in capsys.readouterr().err


@pytest.mark.parametrize(
    "params, word",
    [({"backbone": "efficientnet_lite2"}, "backbone"), ({"image_size": 256}, "image_size"), ({"config_version": 2}, "config_version")],
)
def test_a_model_that_does_not_match_the_project_is_refused(bundle_dir, inbox, tmp_path, capsys, params, word):
    project = _project(tmp_path / "project", **params)
    code = inspect_main([str(inbox), "--model", str(bundle_dir), "--project", str(project), "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_MODEL and word in err and "does not match" in err
    assert not (project / "out").exists()


def test_no_readable_image_fails_and_lists_them(bundle_dir, inbox, elsewhere, capsys):
    assert inspect_main([str(inbox / "broken.png"), "--model", str(bundle_dir), "--quiet"]) == EXIT_NO_IMAGES
    assert "none of the 1 image file(s) could be read" in capsys.readouterr().err
    assert len(pd.read_csv(elsewhere / "inspection" / "rejects.csv")) == 1
    (elsewhere / "empty").mkdir()
    assert inspect_main([str(elsewhere / "empty"), "--model", str(bundle_dir)]) == EXIT_NO_IMAGES
    assert "no image files found" in capsys.readouterr().err


def test_defaults_come_from_the_project_and_its_champion(bundle_dir, inbox, tmp_path, capsys):
    project = _project(tmp_path / "project")
    ModelStore(project / "models").promote(bundle_dir, {"reason": "test"})
    assert inspect_main([str(inbox), "--project", str(project), "--quiet"]) == EXIT_OK
    assert "with model v0001" in capsys.readouterr().out
    out = project / "out" / "inspection"
    assert len(pd.read_csv(out / "predictions.csv")) == 3
    assert max(int(s) for s in cv2.imread(str(next((out / "overlays").iterdir()))).shape[:2]) <= 64


def test_bad_usage_exits_2(bundle_dir, inbox, elsewhere, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inspect_main([str(inbox), "--batch-size", "0"])
    assert exit_info.value.code == EXIT_USAGE
    (elsewhere / "mine").mkdir()
    (elsewhere / "mine" / "keep.txt").write_text("x")
    assert inspect_main([str(inbox), "--model", str(bundle_dir), "--out", "mine", "--quiet"]) == EXIT_USAGE
    assert "not an earlier inspection output" in capsys.readouterr().err
    assert inspect_main([str(inbox), "--project", str(elsewhere)]) == EXIT_USAGE


def test_the_process_exit_status_reaches_the_shell(inbox, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "fsad_pipeline.console", str(inbox), "--model", str(tmp_path / "nope")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_MODEL and "fsad-inspect: error: no model at" in done.stderr
