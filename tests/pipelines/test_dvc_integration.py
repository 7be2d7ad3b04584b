"""DVC end to end on the tiny generated dataset, in a throw-away git repository.

One test, because each step builds on the state the previous one left (a real user's session):
repro runs every stage; status is clean and a second repro runs nothing; `dvc exp run
--set-param` on a parameter only evaluation reads re-runs evaluation alone; a parameter only
memory_bank reads marks memory_bank alone as changed; a new raw image re-runs from ingestion
(training is skipped: its inputs come out byte-identical); push, wipe cache and outputs, pull
restores every file under data/ byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STAGES = ["ingestion", "synthesis", "training", "memory_bank", "scoring", "evaluation"]


class DvcRepo:
    """A tiny project turned into a git + DVC repository; runs dvc/git with the venv's tools."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `dvc` and the stages' `kedro`
            "PYTHONPATH": str(root / "src"),
            "DVC_NO_ANALYTICS": "1",
            "DO_NOT_TRACK": "1",
            "KEDRO_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "1",
        }
        self.seconds: dict[str, float] = {}

    def run(self, *args: str, label: str | None = None) -> str:
        start = time.perf_counter()
        result = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True)
        if label:
            self.seconds[label] = round(time.perf_counter() - start, 1)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{output[-4000:]}"
        return output

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "-m", message)

    def repro(self, label: str) -> list[str]:
        """Run `dvc repro`; return the stages that ran, in order."""
        return re.findall(r"Running stage '(\w+)'", self.run("dvc", "repro", label=label))

    def status(self) -> dict:
        return json.loads(self.run("dvc", "status", "--json"))

    def outputs(self) -> list[Path]:
        lock = yaml.safe_load((self.root / "dvc.lock").read_text())
        return [self.root / out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]

    def data_digests(self) -> dict[str, str]:
        """sha256 of every file under data/."""
        return {
            str(path.relative_to(self.root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted((self.root / "data").rglob("*"))
            if path.is_file()
        }


@pytest.fixture
def dvc_repo(tiny_project) -> DvcRepo:
    if shutil.which("git") is None or not (VENV_BIN / "dvc").exists():
        pytest.skip("needs git and the venv's dvc")
    root = tiny_project.root
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    (root / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(PROJECT_ROOT / ".dvc" / name, root / ".dvc" / name)
    shutil.rmtree(root / "src")  # the code deps of dvc.yaml must exist: the package source, not a stub
    shutil.copytree(PROJECT_ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for folder in (PROJECT_ROOT / "data").iterdir():
        if folder.is_dir():
            (root / "data" / folder.name).mkdir(parents=True, exist_ok=True)
            (root / "data" / folder.name / ".gitkeep").touch()
    repo = DvcRepo(root)
    repo.run("git", "init", "-q")
    repo.run("git", "config", "user.email", "test@example.com")
    repo.run("git", "config", "user.name", "test")
    repo.commit("tiny project")
    return repo


def test_dvc_repro_exp_status_push_pull(dvc_repo: DvcRepo, tmp_path: Path):
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
    assert repo.repro("repro after a new image") == ["ingestion", "synthesis", "memory_bank", "scoring", "evaluation"]
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
