"""Benchmark: the real ``dfd`` pipeline over several k and seeds, with time and memory.

Each (k, seed) is one ``kedro run --pipelines=dfd`` in a child process, inside a scratch copy
of the project (conf + pyproject) so the benchmark never overwrites your own ``data/``. The
child's peak RSS (its whole process tree) is sampled while it runs. Results go to
``<out>/benchmark.json`` and ``<out>/benchmark.md``.

    python -m fsad_pipeline.benchmark --ks 1 2 4 --seeds 0 1 2
    python -m fsad_pipeline.benchmark --ks 2 --seeds 0 --params dfd.meta_epochs=10

``--fleet`` instead times the ``fleet`` pipeline over 2 and 4 categories (``--fleet-sizes``), once
with the SequentialRunner and once with the DaskRunner on a LocalCluster of 2 single-thread worker
processes: wall seconds, speed-up and the peak RSS of every worker process. Categories are
pseudo-categories of the built-in textile data (disjoint image blocks), or with ``--fleet-root``
the first categories of an MVTec-layout folder (e.g. ../shared/data/base_categories).

    python -m fsad_pipeline.benchmark --fleet --fleet-sizes 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
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


# --------------------------------------------------------------------------------------------
# Fleet: SequentialRunner vs DaskRunner
# --------------------------------------------------------------------------------------------

#: Small settings for the fleet benchmark (a category in well under a minute on 2 cores); the
#: textile pseudo-categories take 10 support-pool, 20 good and 2 x 10 defect test images each.
FLEET_SMALL_PARAMS = ",".join(
    [
        "image_size=128",
        "data.textile.n_train_good=10",
        "data.textile.n_test_good=20",
        "data.textile.n_test_per_defect=10",
        "synthesis.n_per_image=10",
        "synthesis.validation.n_per_image=5",
        "dfd.meta_epochs=3",
        "dfd.epochs=1",
        "fusion.n_trials=50",
    ]
)
FLEET_DASK_RUNNER = "fsad_pipeline.runners.DaskRunner"


def _is_dask_worker(process: psutil.Process) -> bool:
    """LocalCluster worker processes are multiprocessing children (not its resource tracker)."""
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return "multiprocessing" in command and "resource_tracker" not in command


#: The fleet benchmark's runs: the SequentialRunner (torch's default threads: one per core), the
#: SequentialRunner with one torch thread (the single-core cost of a category), the DaskRunner.
FLEET_VARIANTS = {
    "sequential": "SequentialRunner",
    "sequential-1thread": "SequentialRunner, 1 torch thread",
    "dask": "DaskRunner",
}


def run_fleet_once(
    workdir: Path, params: str, *, variant: str = "sequential", dask_workers: int = 2, log_path: Path | None = None
) -> dict:
    """One ``kedro run --pipelines=fleet`` as :data:`FLEET_VARIANTS` ``variant`` (the DaskRunner with
    ``dask_workers`` single-thread workers): wall and CPU seconds, peak RSS of the run and of each worker."""
    command = [sys.executable, "-m", "kedro", "run", "--pipelines=fleet", f"--params={params}"]
    env = {**os.environ, "DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1"}
    if variant == "dask":
        command += [f"--runner={FLEET_DASK_RUNNER}", f"--runner-params=n_workers={dask_workers},threads_per_worker=1"]
    elif variant == "sequential-1thread":
        env["OMP_NUM_THREADS"] = "1"  # torch's intra-op threads, read when torch starts
    elif variant != "sequential":
        raise ValueError(f"unknown fleet benchmark variant {variant!r}; choose from {list(FLEET_VARIANTS)}")
    dask_workers = dask_workers if variant == "dask" else 0
    env.pop("DASK_SCHEDULER_ADDRESS", None)  # always this machine's LocalCluster
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    peaks: dict[int, int] = {}
    cpu_seen: dict[int, float] = {}
    workers: set[int] = set()
    total_peak = 0
    with open(log_path or os.devnull, "w") as log:
        child = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
        driver = psutil.Process(child.pid)
        while child.poll() is None:
            total = 0
            try:
                processes = [driver, *driver.children(recursive=True)]
            except psutil.Error:
                processes = []
            for proc in processes:
                try:
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                cpu_seen[proc.pid] = times.user + times.system
                total += rss
                peaks[proc.pid] = max(peaks.get(proc.pid, 0), rss)
                if proc.pid != child.pid and proc.pid not in workers and _is_dask_worker(proc):
                    workers.add(proc.pid)
            total_peak = max(total_peak, total)
            time.sleep(0.25)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the run and every process it reaped (workers included): the cost, whatever
    # else the machine was doing; the sampled sum is a cross-check (it misses the last 0.25 s).
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if child.returncode != 0:
        raise RuntimeError(f"fleet run failed ({variant}); see {log_path}")
    table = pd.read_csv(workdir / "data" / "08_reporting" / "fleet" / "fleet_metrics.csv")
    worker_peaks = [peaks[pid] / 2**30 for pid in sorted(workers)] if dask_workers else [peaks.get(child.pid, 0) / 2**30]
    return {
        "runner": FLEET_VARIANTS[variant],
        "variant": variant,
        "workers": dask_workers or 1,
        "categories": table["category"].tolist(),
        "image_auroc": table["image_auroc"].tolist(),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "cpu_seconds_sampled": sum(cpu_seen.values()),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "driver_peak_rss_gib": peaks.get(child.pid, 0) / 2**30,
        "worker_peak_rss_gib": worker_peaks,
        "total_peak_rss_gib": total_peak / 2**30,
    }


def _write_fleet_conf(workdir: Path, fleet: dict) -> None:
    """The fleet block for this size, in the scratch project's base configuration. (Not in
    conf/local: Kedro merges --params into each environment, so a local parameters file would get
    a partial ``data`` block from --params that replaces the base one.)"""
    import yaml

    (workdir / "conf" / "base" / "parameters_fleet.yml").write_text(yaml.safe_dump({"fleet": fleet}))


def fleet_markdown(rows: list[dict]) -> str:
    lines = [
        "| categories | runner | workers | wall s | speed-up | wall s per category | CPU s per category "
        "| peak RSS per worker GiB | peak RSS all GiB | load avg before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        per_worker = ", ".join(f"{v:.2f}" for v in row["worker_peak_rss_gib"])
        n = len(row["categories"])
        lines.append(
            f"| {n} | {row['runner']} | {row['workers']} | {row['wall_seconds']:.1f} | "
            f"{row.get('speed_up', 1.0):.2f} | {row['wall_seconds'] / n:.1f} | {row['cpu_seconds'] / n:.1f} | "
            f"{per_worker} | {row['total_peak_rss_gib']:.2f} | "
            f"{row['load_average_before']:.1f} / {row['load_average_after']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def fleet_benchmark(
    sizes: list[int],
    *,
    out: Path,
    scratch: Path,
    extra_params: str = "",
    root: Path | None = None,
    workers: int = 2,
    variants: tuple[str, ...] = ("sequential", "dask"),
) -> list[dict]:
    """Each variant over each fleet size; speed-up against the ``sequential`` run of the same size.
    Rows go to ``out/fleet_benchmark.{json,md}``."""
    workdir = make_workdir(scratch)
    params = ",".join(p for p in (FLEET_SMALL_PARAMS, extra_params) if p)
    if root is not None:
        available = sorted(p.name for p in Path(root).iterdir() if (p / "train" / "good").is_dir())
        if len(available) < max(sizes):
            raise ValueError(f"{root} holds {len(available)} categories, the benchmark asks for {max(sizes)}")
        params += f",data.source=mvtec,data.root={Path(root).resolve()}"
    rows: list[dict] = []
    for size in sizes:
        fleet = {"categories": available[:size] if root is not None else "auto", "textile_parts": size, "data_overrides": {}}
        _write_fleet_conf(workdir, fleet)
        # Untimed: materialise the textile pseudo-categories (ingestion only) so both runs read the same files.
        warm = subprocess.run([sys.executable, "-m", "kedro", "run", "--pipelines=fleet", "--tags=ingestion",
                               f"--params={params}"], cwd=workdir, capture_output=True, text=True,
                              env={**os.environ, "DO_NOT_TRACK": "1"})
        if warm.returncode != 0:
            raise RuntimeError(f"fleet ingestion failed:\n{warm.stdout[-3000:]}{warm.stderr[-3000:]}")
        group = []
        for variant in variants:
            name = f"fleet_{size}_{variant}"
            print(f"[benchmark] fleet of {size}, {variant} ...", flush=True)
            row = run_fleet_once(workdir, params, variant=variant, dask_workers=workers, log_path=out / f"{name}.log")
            print(f"[benchmark] {name}: {row['wall_seconds']:.1f} s wall, {row['cpu_seconds']:.1f} s CPU, peak RSS "
                  f"per worker {[round(v, 2) for v in row['worker_peak_rss_gib']]} GiB", flush=True)
            group.append(row)
        baseline = next((r for r in group if r["variant"] == "sequential"), group[0])
        for row in group:
            row["speed_up"] = baseline["wall_seconds"] / row["wall_seconds"]
        rows.extend(group)
        payload = {"params": params, "load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "rows": rows}
        (out / "fleet_benchmark.json").write_text(json.dumps(payload, indent=2))
        (out / "fleet_benchmark.md").write_text(fleet_markdown(rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--params", default="", help="extra Kedro runtime params, e.g. dfd.meta_epochs=10")
    parser.add_argument("--env", default=None, help="Kedro environment (e.g. paper)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "08_reporting" / "benchmark")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch project folder (default: a temp dir)")
    parser.add_argument("--micro-only", action="store_true", help="only the coreset / kNN micro-benchmarks")
    parser.add_argument("--fleet", action="store_true", help="time the fleet pipeline: SequentialRunner vs DaskRunner")
    parser.add_argument("--fleet-sizes", type=int, nargs="+", default=[2, 4], help="categories per fleet run")
    parser.add_argument("--fleet-workers", type=int, default=2, help="single-thread Dask worker processes")
    parser.add_argument("--fleet-variants", nargs="+", default=["sequential", "dask"], choices=list(FLEET_VARIANTS),
                        help="runs per fleet size (speed-up is against 'sequential')")
    parser.add_argument("--fleet-root", type=Path, default=None,
                        help="MVTec-layout folder whose first categories form the fleet (default: textile pseudo-categories)")
    args = parser.parse_args(argv)

    if args.fleet:
        args.out.mkdir(parents=True, exist_ok=True)
        scratch = args.workdir or Path(tempfile.mkdtemp(prefix="fsad-fleet-benchmark-"))
        scratch.mkdir(parents=True, exist_ok=True)
        rows = fleet_benchmark(args.fleet_sizes, out=args.out, scratch=scratch, extra_params=args.params,
                               root=args.fleet_root, workers=args.fleet_workers, variants=tuple(args.fleet_variants))
        print(fleet_markdown(rows))
        return 0

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
