"""The committed schedule definitions parse and run a command that exists."""

from __future__ import annotations

import configparser
import re
import shlex
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]  # minute hour day-of-month month day-of-week


def _scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def _valid_cron_field(field: str, low: int, high: int) -> bool:
    for part in field.split(","):
        match = re.fullmatch(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?", part)
        if not match:
            return False
        base, step = match.groups()
        if step is not None and int(step) < 1:
            return False
        if base != "*":
            bounds = [int(x) for x in base.split("-")]
            if not all(low <= b <= high for b in bounds) or bounds != sorted(bounds):
                return False
    return True


def valid_cron(expression: str) -> bool:
    fields = expression.split()
    return len(fields) == 5 and all(_valid_cron_field(f, lo, hi) for f, (lo, hi) in zip(fields, RANGES))


def test_cron_validator_rejects_nonsense():
    assert valid_cron("17 2 * * *") and valid_cron("*/15 0-6 1,15 * 1-5")
    assert not valid_cron("61 2 * * *") and not valid_cron("17 2 * *") and not valid_cron("a b c d e")


def test_crontab_line_is_valid_and_calls_fsad_retrain():
    lines = [l for l in (ROOT / "deploy/cron/fsad-retrain.crontab").read_text().splitlines()
             if l.strip() and not l.startswith("#") and not re.match(r"^\w+=", l)]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    assert valid_cron(" ".join(fields[:5]))
    assert "fsad-retrain" in fields[5] and "fsad-retrain" in _scripts()


def test_systemd_service_and_timer():
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.optionxform = str
    service.read(ROOT / "deploy/systemd/fsad-retrain.service")
    assert service["Service"]["Type"] == "oneshot"
    command = shlex.split(service["Service"]["ExecStart"])
    assert Path(command[0]).name == "fsad-retrain" and "fsad-retrain" in _scripts()
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.optionxform = str
    timer.read(ROOT / "deploy/systemd/fsad-retrain.timer")
    assert timer["Timer"]["Unit"] == "fsad-retrain.service"
    assert re.fullmatch(r"\*-\*-\* \d{2}:\d{2}:\d{2}", timer["Timer"]["OnCalendar"])
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_github_workflow_schedules_fsad_retrain():
    workflow = yaml.safe_load((ROOT / ".github/workflows/retrain.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "workflow_dispatch" in triggers
    assert all(valid_cron(entry["cron"]) for entry in triggers["schedule"])
    steps = workflow["jobs"]["retrain"]["steps"]
    assert any("fsad-retrain" in step.get("run", "") for step in steps)
