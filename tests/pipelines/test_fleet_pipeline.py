"""The fleet pipeline: the dfd chain per category, sequentially and on Dask: a LocalCluster (in-process
and processes), and a real cluster on loopback (``dask scheduler`` + two ``dask worker`` processes driven
by ``kedro run --runner=fsad_pipeline.runners.DaskRunner``) that loses workers mid-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import distributed
import numpy as np
import pandas as pd
import pytest
import torch

from fsad_pipeline.runners import DaskRunner
from fsad_pipeline.scoring.dfd_scorer import DFDScorer

pytestmark = pytest.mark.slow

CATEGORIES = ["gadget", "widget"]
#: Every per-category output compared between runners (arrays and tables; figures are not).
COMPARED = ("07_model_output/{c}/predictions.csv", "07_model_output/{c}/anomaly_maps.npy", "08_reporting/{c}/metrics.json")


@pytest.fixture
def tiny_fleet(tiny_project, datasets):
    """Two tiny MVTec categories under data/01_raw, found by ``fleet.categories: auto``."""
    datasets.mvtec_category(tiny_project.path("data/01_raw"), "gadget", n_train=5, n_test_good=4,
                            defects={"scratch": 3, "spot": 3}, seed=7)
    # Keep the tiny project quick: no per-position Gaussian scorer.
    tiny_project.set_params("parameters_memory_bank.yml", {"memory_bank": {"gaussian": {"enabled": False}}})
    # The Dask workers run one torch thread each (dask.torch_threads); the sequential driver must
    # too, or the run's threads hook sizes its pool from the machine and float reductions split
    # differently (scores then differ in the 6th digit).
    tiny_project.set_params("parameters.yml", {"threads": 1})
    return tiny_project


def fleet_outputs(project) -> dict[str, object]:
    outputs: dict[str, object] = {}
    for category in CATEGORIES:
        for pattern in COMPARED:
            path = project.path("data/" + pattern.format(c=category))
            if path.suffix == ".csv":
                outputs[str(path)] = pd.read_csv(path, keep_default_na=False)
            elif path.suffix == ".npy":
                outputs[str(path)] = np.load(path)
            else:
                metrics = json.loads(path.read_text())
                outputs[str(path)] = {k: v for k, v in metrics.items() if "seconds" not in k and "per_second" not in k}
    outputs["fleet"] = pd.read_csv(project.path("data/08_reporting/fleet/fleet_metrics.csv"))
    return outputs


def assert_same_outputs(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key, a in first.items():
        b = second[key]
        if isinstance(a, pd.DataFrame):
            numeric = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c]) and "seconds" not in c
                       and "per_second" not in c]
            text = [c for c in a.columns if c not in numeric and "seconds" not in c and "per_second" not in c]
            pd.testing.assert_frame_equal(a[text], b[text], obj=key)
            np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), rtol=0, atol=0, err_msg=key)
        elif isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=key)
        else:
            assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True), key


@pytest.fixture
def one_torch_thread():
    """The Dask workers run one torch thread each; the sequential baseline does too, so that
    float reductions split alike and the scores can be compared exactly (with 2 threads they
    differ from 1 thread in the 5th digit)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_fleet_sequential_then_dask(tiny_fleet, one_torch_thread):
    tiny_fleet.run("fleet")
    table = pd.read_csv(tiny_fleet.path("data/08_reporting/fleet/fleet_metrics.csv"))
    assert table["category"].tolist() == CATEGORIES
    assert table["image_auroc"].between(0, 1).all() and {"image_auroc_dfd", "image_auroc_knn"} <= set(table.columns)
    assert tiny_fleet.path("data/08_reporting/fleet/fleet_metrics.png").stat().st_size > 1000
    for category in CATEGORIES:  # each category read its own images, with its own model
        manifest = pd.read_csv(tiny_fleet.path(f"data/02_intermediate/{category}/manifest.csv"))
        assert manifest["path"].str.contains(f"/{category}/").all()
        assert (tiny_fleet.path(f"data/06_models/{category}/dfd") / "scorer.json").exists()
    sequential = fleet_outputs(tiny_fleet)

    # One in-process worker thread: the Dask task graph, memory hand-off (texture bank) and files.
    tiny_fleet.run("fleet", runner=DaskRunner(n_workers=1, threads_per_worker=1, processes=False,
                                               dashboard_address=None))
    assert_same_outputs(sequential, fleet_outputs(tiny_fleet))

    # Two worker processes of one thread each: every node pickled to another process.
    tiny_fleet.run("fleet", runner=DaskRunner(n_workers=2, threads_per_worker=1, processes=True,
                                               dashboard_address=None))
    assert_same_outputs(sequential, fleet_outputs(tiny_fleet))


# --- a real cluster on loopback ---------------------------------------------------------------

def _wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


class LoopbackCluster:
    """A scheduler and single-thread workers as separate processes (workers without a nanny,
    so a killed worker stays dead), all started in the project folder."""

    def __init__(self, root: Path, workdir: Path):
        self.root, self.workdir = root, workdir
        # COLUMNS: Kedro's rich log handler wraps at the terminal width; keep messages on one line.
        self.env = {
            **os.environ, "DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "1000",
            # A loaded 2-core CI box can stall a process for seconds: generous comm timeouts keep a
            # slow heartbeat from reading as a lost scheduler (seen: "scheduler-connection-lost").
            "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "60s",
            "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "300s",
        }
        self.processes: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        scheduler_file = workdir / "scheduler.json"
        self._start([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                     "--no-dashboard", "--scheduler-file", str(scheduler_file)], "scheduler")
        _wait_for(scheduler_file.exists, 120, "the scheduler file")
        self.address = _wait_for(lambda: json.loads(scheduler_file.read_text() or "{}").get("address"), 30,
                                 "the scheduler address")
        self.scheduler_file = scheduler_file
        self.monitor = distributed.Client(self.address, timeout=60)

    def _start(self, command: list[str], name: str) -> subprocess.Popen:
        log = open(self.workdir / f"{name}-{len(self.processes)}.log", "w")
        process = subprocess.Popen(command, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def add_workers(self, count: int) -> None:
        for _ in range(count):
            self.workers.append(self._start(
                [sys.executable, "-m", "dask", "worker", "--scheduler-file", str(self.scheduler_file), "--nthreads",
                 "1", "--no-nanny", "--no-dashboard", "--death-timeout", "60",
                 "--local-directory", str(self.workdir)], "worker"))
        alive = sum(p.poll() is None for p in self.workers)
        _wait_for(lambda: len(self.monitor.scheduler_info()["workers"]) == alive, 180, f"{alive} workers")

    def worker_process(self, address: str) -> subprocess.Popen:
        pid = self.monitor.run(os.getpid, workers=[address])[address]
        return next(p for p in self.workers if p.pid == pid)

    def close(self) -> None:
        self.monitor.close()
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


class KedroRun:
    """``kedro run --pipelines=fleet --runner=...DaskRunner`` in the background, logging to a file."""

    def __init__(self, root: Path, env: dict, log_path: Path, extra: list[str] | None = None):
        command = [sys.executable, "-m", "kedro", "run", "--pipelines=fleet",
                   "--runner=fsad_pipeline.runners.DaskRunner", *(extra or [])]
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text()

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the run did not end within {timeout} s:\n{self.log()[-4000:]}") from None
        return self.process.returncode, self.log()


def kill_worker_running(cluster: LoopbackCluster, markers: tuple[str, ...], run: KedroRun) -> str:
    """Kill the worker that is processing the first task whose key holds one of ``markers``."""
    def busy():
        if not run.running():
            raise AssertionError("the run finished before a worker could be killed:\n" + run.log()[-3000:])
        for address, keys in cluster.monitor.processing().items():
            for key in keys:
                if any(marker in str(key) for marker in markers):
                    return address, str(key)
        return None

    address, key = _wait_for(busy, 600, f"a task like {markers}", interval=0.05)
    cluster.worker_process(address).kill()
    return key


def assert_models_complete(root: Path) -> None:
    """Every model folder that exists is whole (written by an atomic swap), never half-written."""
    for category in CATEGORIES:
        folder = root / "data" / "06_models" / category / "dfd"
        if folder.exists():
            DFDScorer.load(folder, device="cpu")


@pytest.fixture
def cluster(tiny_project, tmp_path):
    work = tmp_path / "dask"
    work.mkdir()
    cluster = LoopbackCluster(tiny_project.root, work)
    yield cluster
    cluster.close()


def test_fleet_on_loopback_cluster_survives_a_killed_worker(tiny_fleet, one_torch_thread, cluster):
    tiny_fleet.run("fleet")  # the sequential baseline
    sequential = fleet_outputs(tiny_fleet)

    cluster.add_workers(2)
    env = {**cluster.env, "DASK_SCHEDULER_ADDRESS": cluster.address}
    code, log = KedroRun(tiny_fleet.root, env, cluster.workdir / "run-clean.log").finish(900)
    assert code == 0, log[-4000:]
    ran_there = cluster.monitor.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert {f"{c}.train_dfd_model" for c in CATEGORIES} <= set(ran_there), ran_there
    assert_same_outputs(sequential, fleet_outputs(tiny_fleet))

    # A worker dies in the middle of a run: Dask re-runs its tasks on the other worker.
    run = KedroRun(tiny_fleet.root, env, cluster.workdir / "run-kill-one.log")
    killed = kill_worker_running(cluster, (".train_dfd_model", ".fit_memory_banks", ".score_test_images"), run)
    code, log = run.finish(900)
    assert_models_complete(tiny_fleet.root)
    if code == 0:
        assert_same_outputs(sequential, fleet_outputs(tiny_fleet))
    else:  # allowed outcome: a clear error naming what was lost
        assert "KilledWorker" in log or "died" in log, log[-4000:]
    print(f"killed the worker running {killed}; run exit code {code}")

    # The last worker dies too: the run fails with a clear message instead of waiting for ever.
    run = KedroRun(tiny_fleet.root, env, cluster.workdir / "run-kill-all.log", ["--runner-params=no_workers_timeout=5"])
    kill_worker_running(cluster, (".",), run)
    code, log = run.finish(300)
    assert code != 0
    assert "has had no worker for" in log, log[-4000:]
    assert_models_complete(tiny_fleet.root)
