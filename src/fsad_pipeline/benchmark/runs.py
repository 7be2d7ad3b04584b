"""Running the real pipeline for a benchmark: one ``kedro run`` in a scratch copy of the project.

Each run is a child process inside a scratch copy of the project (conf + pyproject) so a
benchmark never overwrites your own ``data/``. The child's peak RSS (its whole process tree) is
sampled while it runs. :func:`summarise` and :func:`markdown_table` turn the runs' metrics into
the mean ± std table of ``benchmark.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml
from omegaconf import OmegaConf

#: The project folder (pyproject.toml, conf/, data/): src/fsad_pipeline/benchmark/ is three levels down.
PROJECT_ROOT = Path(__file__).resolve().parents[3]


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_watched(
    command: list[str], log_path: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[int, float, int]:
    """Run ``command`` with its output in ``log_path``: (exit code, wall seconds, peak RSS bytes).

    The peak is the RSS of the child's whole process tree, sampled every 0.25 s.
    """
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        watcher = psutil.Process(child.pid)
        peak = 0
        while child.poll() is None:
            peak = max(peak, _tree_rss(watcher))
            time.sleep(0.25)
    return int(child.returncode), time.perf_counter() - started, peak


def run_once(workdir: Path, params: str, *, env_name: str | None = None, log_path: Path | None = None) -> dict:
    """One ``kedro run --pipelines=dfd`` in ``workdir``; returns its metrics plus wall time and peak RSS,
    and ``node_seconds`` ({node: seconds}) when the run wrote ``node_timings.json`` (see hooks.py)."""
    timings = workdir / "data" / "08_reporting" / "node_timings.json"
    timings.unlink(missing_ok=True)  # a previous run's profile must not pass for this one's
    command = [sys.executable, "-m", "kedro", "run", "--pipelines=dfd", f"--params={params}"]
    if env_name:
        command.append(f"--env={env_name}")
    env = {**os.environ, "DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1"}
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="fsad-run-", suffix=".log")[1])
    returncode, wall, peak = run_watched(command, Path(log_path), cwd=workdir, env=env)
    if returncode != 0:
        tail = "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"kedro run failed ({params}); see {log_path}:\n{tail}")
    metrics = json.loads((workdir / "data" / "08_reporting" / "metrics.json").read_text())
    result = {**metrics, "wall_seconds": wall, "peak_rss_gib": peak / 2**30}
    if timings.is_file():
        result["node_seconds"] = {row["node"]: row["seconds"] for row in json.loads(timings.read_text())["nodes"]}
    return result


def make_workdir(root: Path) -> Path:
    """A scratch project: pyproject + conf (local overrides included) + an empty src/.

    A reused ``root`` gets today's conf (the old copy is replaced): a benchmark must run the
    parameters the project has now, not those of the last run in that folder."""
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root / "pyproject.toml")
    if (root / "conf").exists():
        shutil.rmtree(root / "conf")
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf")
    (root / "src").mkdir(exist_ok=True)
    return root


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    clean = [v for v in values if v is not None]
    if not clean:
        return float("nan"), float("nan")
    return float(np.mean(clean)), float(np.std(clean))


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for k in sorted({r["k_shot"] for r in runs}):
        group = [r for r in runs if r["k_shot"] == k]
        types = sorted({t for r in group for t in r.get("image_auroc_per_defect_type", {})})
        row = {"k_shot": k, "runs": len(group)}
        row["image_auroc"] = _mean_std([r["image_auroc"] for r in group])
        for t in types:
            row[f"image_auroc_{t}"] = _mean_std([r["image_auroc_per_defect_type"].get(t) for r in group])
        row["pixel_auroc"] = _mean_std([r.get("pixel_auroc") for r in group])
        for name in sorted({n for r in group for n in r.get("scorers", {})}):
            row[f"image_auroc_{name}"] = _mean_std([r["scorers"].get(name, {}).get("image_auroc") for r in group])
        row["train_seconds"] = _mean_std([r["train_seconds"] for r in group])
        row["score_images_per_second"] = _mean_std([r["score_images_per_second"] for r in group])
        row["peak_rss_gib"] = _mean_std([r["peak_rss_gib"] for r in group])
        row["wall_seconds"] = _mean_std([r["wall_seconds"] for r in group])
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no runs)\n"
    columns = [c for c in rows[0] if c not in ("k_shot", "runs")]
    header = "| k | runs | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for row in rows:
        cells = []
        for c in columns:
            mean, std = row.get(c, (float("nan"), float("nan")))
            digits = 3 if "auroc" in c else 1 if "seconds" in c or "per_second" in c else 2
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {row['k_shot']} | {row['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"



def load_parameters(conf_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """The project's parameters (every ``parameters*.yml`` of ``conf_dir``) with dot-list overrides."""
    params: dict[str, Any] = {}
    for path in sorted(Path(conf_dir).glob("parameters*.yml")):
        params.update(yaml.safe_load(path.read_text()) or {})
    return load_parameters_with(params, overrides)


def load_parameters_with(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``params`` with OmegaConf dot-list overrides (``a.b.c=value``, as Kedro's ``--params``) merged in."""
    merged = OmegaConf.merge(OmegaConf.create(params), OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]
