"""A throw-away copy of the Kedro project (conf + pyproject) pointed at tiny generated data."""

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
from typing import Any

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]

#: Tiny settings so the whole chain runs in seconds on 2 cores.
TINY_PARAMS: dict[str, Any] = {
    "parameters.yml": {"k_shot": 2, "image_size": 64, "seed": 0, "k_defect_shots": 0},  # the tests that need shots ask
    "parameters_ingestion.yml": {"data": {"source": "mvtec", "category": "widget"}},
    "parameters_synthesis.yml": {"synthesis": {"n_per_image": 4, "validation": {"n_per_image": 3}, "n_examples": 4}},
    "parameters_training.yml": {
        "features": {"pretrain_dim": 32, "target_dim": 32, "batch_size": 8},
        "dfd": {"meta_epochs": 2, "epochs": 1, "gaussian_hidden": 32},
    },
    "parameters_evaluation.yml": {"evaluation": {"n_overlays": 4}},
    "parameters_memory_bank.yml": {
        "support_augmentation": {"rotations": False, "translations": False},
        "memory_bank": {"features": {"pretrain_dim": 32, "target_dim": 32, "batch_size": 8}, "gaussian": {"enabled": True}},
    },
    "parameters_scoring.yml": {"fusion": {"n_trials": 20}},
    "parameters_classification.yml": {
        "classification": {
            "pseudo_classes": {"samples_per_class": 3},
            "encoder": {"hidden_channels": [16], "embed_dim": 8},
            "pretrain": {"max_episodes": 3, "n_query": 4},
            "fine_tune": {"epochs": 2},
        }
    },
}


def deep_update(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


class TinyProject:
    def __init__(self, root: Path):
        self.root = root

    def set_params(self, file_name: str, update: dict) -> None:
        path = self.root / "conf" / "base" / file_name
        params = yaml.safe_load(path.read_text()) if path.exists() else {}
        path.write_text(yaml.safe_dump(deep_update(params or {}, update)))

    def run(self, pipelines: list[str] | str, params: dict | None = None, runner=None) -> dict:
        from kedro.framework.session import KedroSession
        from kedro.framework.startup import bootstrap_project

        bootstrap_project(self.root)
        names = [pipelines] if isinstance(pipelines, str) else pipelines
        with KedroSession.create(project_path=self.root, runtime_params=params or {}) as session:
            return session.run(pipeline_names=names, runner=runner)

    def path(self, relative: str) -> Path:
        return self.root / relative


@pytest.fixture
def tiny_project(tmp_path: Path, datasets, monkeypatch) -> TinyProject:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    (root / "src").mkdir()  # kedro wants the source dir; the package itself is installed
    raw = root / "data" / "01_raw"
    datasets.mvtec_category(raw, "widget", n_train=5, n_test_good=4, defects={"scratch": 3, "spot": 3})
    project = TinyProject(root)
    for file_name, update in TINY_PARAMS.items():
        project.set_params(file_name, update)
    monkeypatch.chdir(root)  # relative catalog paths resolve inside the copy
    return project


# --------------------------------------------------------------------------------------------
# The tiny project as a git + DVC repository (tests of `dvc repro` and `fsad-retrain`)
# --------------------------------------------------------------------------------------------
VENV_BIN = Path(sys.executable).parent


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
