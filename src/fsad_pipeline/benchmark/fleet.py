"""Fleet benchmark: the ``fleet`` pipeline with the SequentialRunner vs the DaskRunner.

Times the ``fleet`` pipeline over 2 and 4 categories (``--fleet-sizes``), once with the
SequentialRunner and once with the DaskRunner on a LocalCluster of 2 single-thread worker
processes: wall seconds, speed-up and the peak RSS of every worker process. Categories are
pseudo-categories of the built-in textile data (disjoint image blocks), or with ``--fleet-root``
the first categories of an MVTec-layout folder (e.g. ../shared/data/base_categories).

    python -m fsad_pipeline.benchmark --fleet --fleet-sizes 2 4
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil

from fsad_pipeline.benchmark.runs import make_workdir


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

