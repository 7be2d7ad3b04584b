"""fsad-retrain end to end on the tiny project (a git + DVC repository): promotion, nothing new,
rejection, a crash mid-run, the lock, rollback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from .conftest import VENV_BIN

pytestmark = pytest.mark.slow


def _retrain(repo, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "fsad-retrain"), "--project", str(repo.root), *args],
        cwd=repo.root, env=repo.env, capture_output=True, text=True,
    )


def _decisions(repo) -> list[dict]:
    folder = repo.root / "models" / "decisions"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


def _champion(repo) -> str:
    return os.readlink(repo.root / "models" / "champion").split("/")[-1]


def _add_image(repo, name: str) -> None:
    good = repo.root / "data/01_raw/widget/train/good"
    shutil.copy(good / "000.png", good / name)


def test_retrain_promotes_skips_rejects_survives_a_crash_and_rolls_back(dvc_repo):
    repo = dvc_repo
    if not (VENV_BIN / "fsad-retrain").exists():
        pytest.skip("fsad-retrain is not installed in the venv (pip install -e .)")

    # 1. No champion yet: dvc repro runs the chain and the challenger is promoted.
    first = _retrain(repo)
    assert first.returncode == 0, first.stdout + first.stderr
    (record,) = _decisions(repo)
    assert record["outcome"] == "promoted" and record["promoted_version"] == "v0001", record
    assert record["validation"]["newly_frozen"] and record["challenger_metrics"]["images"] > 0
    assert _champion(repo) == "v0001" and (repo.root / "models/frozen_validation/samples.csv").exists()

    # 2. Nothing new: exit 0, no retraining, no new record.
    second = _retrain(repo)
    assert second.returncode == 0 and "nothing to do" in second.stdout
    assert len(_decisions(repo)) == 1

    # 3. New data, but the challenger must beat the champion by 1.0 AUROC: rejected, champion kept.
    _add_image(repo, "200.png")
    third = _retrain(repo, "--tolerance=-1")
    assert third.returncode == 0, third.stdout + third.stderr
    record = _decisions(repo)[-1]
    assert record["outcome"] == "rejected" and record["champion_metrics"]["images"] == record["validation"]["images"]
    assert not record["validation"]["newly_frozen"]  # both scored on the frozen set
    assert _champion(repo) == "v0001"

    # 4. A crash mid-run (a broken parameter makes `dvc repro` fail): exit 1, a "failed" record,
    #    the champion untouched, the lock released.
    params_file = repo.root / "conf/base/parameters_synthesis.yml"
    params = yaml.safe_load(params_file.read_text())
    params["synthesis"]["n_per_image"] = "not a number"
    params_file.write_text(yaml.safe_dump(params))
    fourth = _retrain(repo, "--force")
    assert fourth.returncode == 1, fourth.stdout + fourth.stderr
    record = _decisions(repo)[-1]
    assert record["outcome"] == "failed" and "dvc repro" in record["reason"]
    assert _champion(repo) == "v0001" and not (repo.root / "models/.retrain.lock").exists()

    # 5. A live run holds the lock: a second one exits 75 at once.
    (repo.root / "models/.retrain.lock").write_text(
        json.dumps({"pid": os.getpid(), "host": os.uname().nodename})
    )
    busy = _retrain(repo)
    assert busy.returncode == 75 and "another retraining run" in busy.stderr
    (repo.root / "models/.retrain.lock").unlink()

    # 6. Rollback: v0001 is the only version, so there is nothing to roll back to.
    rollback = _retrain(repo, "--rollback")
    assert rollback.returncode == 3 and "nothing to roll back" in rollback.stderr
