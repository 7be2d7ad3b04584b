"""DVC end to end on the tiny generated dataset, in a throw-away git repository.

One test, because each step builds on the state the previous one left (a real user's session):
repro runs every stage; status is clean and a second repro runs nothing; `dvc exp run
--set-param` on a parameter only evaluation reads re-runs evaluation alone; a parameter only
memory_bank reads marks memory_bank alone as changed; a new raw image re-runs from ingestion
(training is skipped: its inputs come out byte-identical); push, wipe cache and outputs, pull
restores every file under data/ byte for byte.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

STAGES = ["ingestion", "synthesis", "training", "memory_bank", "scoring", "classification", "evaluation"]


def test_dvc_repro_exp_status_push_pull(dvc_repo, tmp_path: Path):
    repo = dvc_repo
    assert repo.repro("repro") == STAGES
    assert repo.status() == {}
    assert repo.repro("repro again") == [], "a second repro must be a no-op"
    repo.commit("first run")
    metrics = json.loads((repo.root / "data/08_reporting/metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0

    # A parameter only evaluation reads, set from the command line (parameters live in several files).
    output = repo.run("dvc", "exp", "run", "--set-param", "conf/base/parameters_evaluation.yml:evaluation.n_overlays=2",
                      label="exp run")
    assert re.findall(r"Running stage '(\w+)'", output) == ["evaluation"]
    assert yaml.safe_load((repo.root / "conf/base/parameters_evaluation.yml").read_text())["evaluation"]["n_overlays"] == 2
    assert repo.status() == {}
    assert "evaluation.n_overlays" in repo.run("dvc", "params", "diff")
    assert "image_auroc" in repo.run("dvc", "metrics", "diff", "--all")
    plots = json.loads(repo.run("dvc", "plots", "diff", "--json"))["data"]
    assert set(plots) == {"data/07_model_output/predictions.csv", "data/08_reporting/roc_curve.csv"}
    for name, (plot,) in plots.items():
        assert plot["revisions"] == ["workspace", "HEAD"] and plot["content"]["data"]["values"], name
    repo.commit("fewer overlays")

    # A parameter only memory_bank reads: only memory_bank is out of date (its descendants follow
    # once its outputs change). Checked without running, then put back.
    memory_file = repo.root / "conf/base/parameters_memory_bank.yml"
    original = memory_file.read_text()
    params = yaml.safe_load(original)
    params["memory_bank"]["map_sigma"] = 2.0
    memory_file.write_text(yaml.safe_dump(params))
    assert list(repo.status()) == ["memory_bank"]
    memory_file.write_text(original)
    assert repo.status() == {}

    # New raw data: ingestion re-runs and everything reading the manifest after it. The support set
    # is unchanged, so synthesis writes byte-identical files and training is skipped.
    manifest = repo.root / "data/02_intermediate/manifest.csv"
    rows_before = len(manifest.read_text().splitlines())
    good = repo.root / "data/01_raw/widget/test/good"
    shutil.copy(good / "000.png", good / "100.png")
    assert repo.repro("repro after a new image") == ["ingestion", "synthesis", "memory_bank", "scoring", "classification", "evaluation"]
    assert len(manifest.read_text().splitlines()) == rows_before + 1
    repo.commit("one more image")

    # Push, lose the cache and every output, pull: the same bytes come back.
    remote = tmp_path / "dvc-remote"
    repo.run("dvc", "remote", "add", "-d", "local", str(remote))
    repo.run("dvc", "push", label="push")
    before = repo.data_digests()
    shutil.rmtree(repo.root / ".dvc" / "cache")
    for output in repo.outputs():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    assert not any(output.exists() for output in repo.outputs())
    repo.run("dvc", "pull", label="pull")
    assert repo.data_digests() == before
    assert repo.status() == {}
    print("dvc integration seconds:", repo.seconds)
