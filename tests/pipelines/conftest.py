"""A throw-away copy of the Kedro project (conf + pyproject) pointed at tiny generated data."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]

#: Tiny settings so the whole chain runs in seconds on 2 cores.
TINY_PARAMS: dict[str, Any] = {
    "parameters.yml": {"k_shot": 2, "image_size": 64, "seed": 0},
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
