"""Benchmark: the real ``dfd`` pipeline over several k and seeds, with time and memory.

Each (k, seed) is one ``kedro run --pipelines=dfd`` in a child process, inside a scratch copy
of the project (conf + pyproject) so the benchmark never overwrites your own ``data/``. The
child's peak RSS (its whole process tree) is sampled while it runs. Results go to
``<out>/benchmark.json`` and ``<out>/benchmark.md``.

    python -m fsad_pipeline.benchmark --ks 1 2 4 --seeds 0 1 2
    python -m fsad_pipeline.benchmark --ks 2 --seeds 0 --params dfd.meta_epochs=10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_once(workdir: Path, params: str, *, env_name: str | None = None, log_path: Path | None = None) -> dict:
    """One ``kedro run --pipelines=dfd`` in ``workdir``; returns its metrics plus wall time and peak RSS."""
    command = [sys.executable, "-m", "kedro", "run", "--pipelines=dfd", f"--params={params}"]
    if env_name:
        command.append(f"--env={env_name}")
    env = {**os.environ, "DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1"}
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="fsad-run-", suffix=".log")[1])
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
        watcher = psutil.Process(child.pid)
        peak = 0
        while child.poll() is None:
            peak = max(peak, _tree_rss(watcher))
            time.sleep(0.25)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        tail = "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"kedro run failed ({params}); see {log_path}:\n{tail}")
    metrics = json.loads((workdir / "data" / "08_reporting" / "metrics.json").read_text())
    return {**metrics, "wall_seconds": wall, "peak_rss_gib": peak / 2**30}


def make_workdir(root: Path) -> Path:
    """A scratch project: pyproject + conf (local overrides included) + an empty src/."""
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root / "pyproject.toml")
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


def micro_benchmarks(*, bank_size: int = 100_000, dim: int = 152, queries: int = 10_000, seed: int = 0) -> dict:
    """Coreset seconds and kNN faiss-vs-torch speed on a random ``bank_size`` x ``dim`` bank."""
    import torch

    from fsad_pipeline.models.coreset import kcenter_greedy
    from fsad_pipeline.models.memory_bank import NearestNeighbourIndex

    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn(bank_size, dim, generator=generator)
    probe = torch.randn(queries, dim, generator=generator)
    result: dict = {"bank_size": bank_size, "dim": dim, "queries": queries}
    started = time.perf_counter()
    kcenter_greedy(bank, 0.01, seed=seed, progress=False)
    result["coreset_seconds_ratio_0.01"] = time.perf_counter() - started
    for backend in ("faiss", "torch"):
        try:
            index = NearestNeighbourIndex(backend=backend)
            index.build(bank)
        except (ImportError, RuntimeError, ValueError) as error:  # faiss not installed
            result[f"knn_{backend}_seconds"] = None
            result[f"knn_{backend}_error"] = str(error)
            continue
        started = time.perf_counter()
        index.search(probe, 1)
        result[f"knn_{backend}_seconds"] = time.perf_counter() - started
    if result.get("knn_faiss_seconds") and result.get("knn_torch_seconds"):
        result["knn_torch_over_faiss_time"] = result["knn_torch_seconds"] / result["knn_faiss_seconds"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--params", default="", help="extra Kedro runtime params, e.g. dfd.meta_epochs=10")
    parser.add_argument("--env", default=None, help="Kedro environment (e.g. paper)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "08_reporting" / "benchmark")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch project folder (default: a temp dir)")
    parser.add_argument("--micro-only", action="store_true", help="only the coreset / kNN micro-benchmarks")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    micro = micro_benchmarks()
    (args.out / "micro.json").write_text(json.dumps(micro, indent=2))
    print("[benchmark] micro:", json.dumps(micro), flush=True)
    if args.micro_only:
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.workdir or Path(tempfile.mkdtemp(prefix="fsad-benchmark-"))
    scratch.mkdir(parents=True, exist_ok=True)
    workdir = make_workdir(scratch)
    runs = []
    for k in args.ks:
        for seed in args.seeds:
            params = ",".join(p for p in (f"k_shot={k}", f"seed={seed}", args.params) if p)
            print(f"[benchmark] k={k} seed={seed} ...", flush=True)
            result = run_once(workdir, params, env_name=args.env, log_path=args.out / f"run_k{k}_seed{seed}.log")
            runs.append(result)
            print(
                f"[benchmark] k={k} seed={seed}: image AUROC {result['image_auroc']:.3f}, "
                f"train {result['train_seconds']:.0f} s, scoring {result['score_images_per_second']:.1f} img/s, "
                f"peak RSS {result['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
            rows = summarise(runs)
            payload = {"params": args.params, "env": args.env, "micro": micro, "runs": runs, "summary": rows}
            (args.out / "benchmark.json").write_text(json.dumps(payload, indent=2))
            (args.out / "benchmark.md").write_text(markdown_table(rows))
    print(markdown_table(summarise(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
