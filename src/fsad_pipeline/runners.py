"""``DaskRunner``: every Kedro node a Dask task, on a laptop or on a cluster, with the same code.

After Kedro's deployment guide for Dask (a runner that submits each node with ``client.submit`` and
passes the upstream nodes' futures as arguments, so the scheduler runs a node only after the
nodes it depends on), written for Kedro 1.7's ``AbstractRunner``:

* **Where it runs.** ``address`` (``--runner-params address=tcp://host:8786``), else the
  ``DASK_SCHEDULER_ADDRESS`` environment variable, else the ``dask.scheduler_address`` parameter:
  connect to that scheduler. None of them: start a ``LocalCluster`` of ``dask.n_workers`` processes
  with ``dask.threads_per_worker`` threads each (``DASK_N_WORKERS`` / ``DASK_THREADS_PER_WORKER``
  override), closed again when the run ends.
* **Threads.** A worker plugin sets ``torch.set_num_threads(dask.torch_threads)`` (default 1) and
  OpenCV's thread count on every worker, so N single-thread workers use N cores, not N x cores.
* **Hand-off between workers.** File-backed datasets are written by the worker that runs the
  producing node and read by whichever worker runs the consumer: workers must see the same files
  (one machine, or a shared file system; the catalog holds absolute paths, and relative parameter
  paths such as ``data.root`` resolve against the worker's working directory, which the runner
  checks). Memory datasets never go to disk: the producing task returns them, they stay in that
  worker's memory as the task's result, and Dask copies them worker-to-worker to the tasks that
  read them; the runner drops its reference once every reader is done, so Dask frees them.
  Memory outputs nobody reads come back to this process and are saved in the run's catalog.
* **Failures.** A node error is raised here with the remote traceback and the ``--from-nodes``
  resume hint. When a worker dies, Dask re-runs its tasks (and recomputes lost memory results) on
  the others; a task that keeps killing workers ends as ``KilledWorker`` and the run fails, naming
  the node. Model datasets are written atomically (``artifacts.atomic_directory``), so a worker
  killed mid-save never leaves a half-written model where a reader would find it.
* **Hooks.** Node and dataset hooks run on the workers with a hook manager built there from the
  project's settings (as with Kedro's ``ParallelRunner``); pipeline hooks run here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from distributed import Client, LocalCluster, wait
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.scheduler import KilledWorker
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import AbstractRunner
from kedro.runner.task import Task

if TYPE_CHECKING:
    from kedro.io import AbstractDataset, CatalogProtocol
    from kedro.pipeline import Pipeline
    from kedro.pipeline.node import Node
    from pluggy import PluginManager

logger = logging.getLogger(__name__)

#: Defaults when neither runner arguments, environment nor the ``dask`` parameters say otherwise.
DEFAULTS: dict[str, Any] = {
    "scheduler_address": None,
    "n_workers": 2,
    "threads_per_worker": 1,
    "processes": True,
    "memory_limit": "auto",
    "dashboard_address": ":8787",
    "torch_threads": 1,
    "no_workers_timeout": 300.0,  # seconds without any worker before the run gives up
}
_ENVIRONMENT = {
    "scheduler_address": "DASK_SCHEDULER_ADDRESS",
    "n_workers": "DASK_N_WORKERS",
    "threads_per_worker": "DASK_THREADS_PER_WORKER",
}
_PLUGIN_NAME = "fsad-pipeline-worker-setup"
_POLL_SECONDS = 2.0


def _parse_env(name: str, raw: str) -> Any:
    return raw if name == "scheduler_address" else int(raw)


def resolve_dask_settings(arguments: dict[str, Any], parameters: dict[str, Any] | None) -> dict[str, Any]:
    """Runner arguments > environment variables > ``dask`` parameters > :data:`DEFAULTS`."""
    parameters = parameters or {}
    settings = {}
    for key, default in DEFAULTS.items():
        if arguments.get(key) is not None:
            settings[key] = arguments[key]
        elif key in _ENVIRONMENT and os.environ.get(_ENVIRONMENT[key]):
            settings[key] = _parse_env(key, os.environ[_ENVIRONMENT[key]])
        elif key in parameters:  # a null parameter means None (no dashboard, no scheduler address)
            settings[key] = parameters[key]
        else:
            settings[key] = default
    return settings


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


class WorkerSetup(WorkerPlugin):
    """Thread limits and the Kedro project's settings on every worker (current and future)."""

    name = _PLUGIN_NAME

    def __init__(self, torch_threads: int, package_name: str | None) -> None:
        self.torch_threads = int(torch_threads)
        self.package_name = package_name
        self._previous_threads: int | None = None

    def setup(self, worker) -> None:
        import cv2
        import torch

        self._previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        cv2.setNumThreads(self.torch_threads)
        from kedro.framework import project

        if self.package_name and project.PACKAGE_NAME != self.package_name:
            project.configure_project(self.package_name)

    def teardown(self, worker) -> None:
        if self._previous_threads is not None:  # matters for in-process (processes=False) workers
            import torch

            torch.set_num_threads(self._previous_threads)


_hook_manager_lock = threading.Lock()
_hook_manager: PluginManager | None = None


def _worker_hook_manager() -> PluginManager:
    """One hook manager per worker process, from the project's settings (it cannot be pickled)."""
    global _hook_manager
    with _hook_manager_lock:
        if _hook_manager is None:
            from kedro.framework.hooks.manager import (
                _create_hook_manager,
                _register_hooks,
                _register_hooks_entry_points,
            )
            from kedro.framework.project import settings

            manager = _create_hook_manager()
            _register_hooks(manager, settings.HOOKS)
            _register_hooks_entry_points(manager, settings.DISABLE_HOOKS_FOR_PLUGINS)
            _hook_manager = manager
        return _hook_manager


def run_node_task(
    node: Node,
    datasets: dict[str, AbstractDataset],
    memory_outputs: list[str],
    upstream_results: dict[str, dict[str, Any]],
    is_async: bool,
    run_id: str | None,
) -> dict[str, Any]:
    """Run one node on a worker; return its memory outputs (the only data that leaves the task).

    ``datasets``: the node's file-backed datasets and parameters, pickled from the run's catalog.
    ``upstream_results``: the upstream tasks' memory outputs (Dask resolved their futures here).
    """
    values: dict[str, Any] = {}
    for result in upstream_results.values():
        values.update(result)
    task_datasets = dict(datasets)
    for name in node.inputs:
        if name in values:
            task_datasets[name] = MemoryDataset(values[name], copy_mode="assign")
    for name in memory_outputs:
        task_datasets[name] = MemoryDataset(copy_mode="assign")
    catalog = DataCatalog(datasets=task_datasets)
    Task(node=node, catalog=catalog, is_async=is_async, hook_manager=_worker_hook_manager(), run_id=run_id).execute()
    return {name: catalog.load(name) for name in memory_outputs}


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


class DaskRunner(AbstractRunner):
    """Run a Kedro pipeline's nodes as Dask tasks (see the module docstring)."""

    def __init__(
        self,
        address: str | None = None,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool | None = None,
        memory_limit: str | int | None = None,
        dashboard_address: str | None = None,
        torch_threads: int | None = None,
        no_workers_timeout: float | None = None,
        client: Client | None = None,
        is_async: bool = False,
    ):
        """Arguments left ``None`` come from the environment or the ``dask`` parameters.

        Args:
            address: Scheduler to connect to (else a ``LocalCluster`` is started).
            n_workers, threads_per_worker, processes, memory_limit, dashboard_address: the
                ``LocalCluster`` (ignored when connecting to a scheduler).
            torch_threads: ``torch.set_num_threads`` on every worker.
            no_workers_timeout: Seconds the run waits while the cluster has no worker at all.
            client: An existing ``distributed.Client`` to use (left open afterwards).
            is_async: Load and save each node's datasets in threads (Kedro's ``--async``).
        """
        super().__init__(is_async=is_async)
        self._arguments = {
            "scheduler_address": address,
            "n_workers": n_workers,
            "threads_per_worker": threads_per_worker,
            "processes": processes,
            "memory_limit": memory_limit,
            "dashboard_address": dashboard_address,
            "torch_threads": torch_threads,
            "no_workers_timeout": no_workers_timeout,
        }
        self._client = client
        self.settings: dict[str, Any] = {}

    def _get_executor(self, max_workers: int) -> None:
        return None  # the Dask client is the executor; see _run

    # -- cluster ------------------------------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[Client]:
        if self._client is not None:
            yield self._client
            return
        settings = self.settings
        if settings["scheduler_address"]:
            client = Client(settings["scheduler_address"])
            self._logger.info("Dask: connected to the scheduler at %s", settings["scheduler_address"])
            try:
                yield client
            finally:
                client.close()
            return
        cluster = LocalCluster(
            n_workers=int(settings["n_workers"]),
            threads_per_worker=int(settings["threads_per_worker"]),
            processes=bool(settings["processes"]),
            memory_limit=settings["memory_limit"],
            dashboard_address=settings["dashboard_address"],
        )
        client = Client(cluster)
        self._logger.info(
            "Dask: started a LocalCluster, %d %s x %d thread(s) (dashboard %s)",
            int(settings["n_workers"]),
            "processes" if settings["processes"] else "in-process workers",
            int(settings["threads_per_worker"]),
            client.dashboard_link if settings["dashboard_address"] else "off",
        )
        try:
            yield client
        finally:
            client.close()
            cluster.close()

    def _prepare_workers(self, client: Client) -> None:
        from kedro.framework.project import PACKAGE_NAME

        client.register_plugin(WorkerSetup(int(self.settings["torch_threads"]), PACKAGE_NAME), name=_PLUGIN_NAME)
        here = os.getcwd()
        elsewhere = {address: cwd for address, cwd in client.run(os.getcwd).items() if cwd != here}
        if elsewhere:
            self._logger.warning(
                "Dask workers run in another directory than this process (%s): relative paths in "
                "parameters (data.root) resolve there; start workers in the project folder or use "
                "absolute / shared paths. %s",
                here,
                elsewhere,
            )
        threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        if threads > len(client.scheduler_info()["workers"]):
            self._logger.warning(
                "Dask workers run several threads each: nodes that seed torch's global RNG may then "
                "interleave, so results can differ from a sequential run (use 1 thread per worker)"
            )

    # -- the run ------------------------------------------------------------------------------

    def _run(
        self,
        pipeline: Pipeline,
        catalog: CatalogProtocol,
        hook_manager: PluginManager | None = None,
        run_id: str | None = None,
    ) -> None:
        parameters = catalog.load("parameters") if "parameters" in catalog else {}
        self.settings = resolve_dask_settings(self._arguments, (parameters or {}).get("dask"))
        with self._connect() as client:
            self._prepare_workers(client)
            self._run_on(client, pipeline, catalog, run_id)

    @staticmethod
    def _is_memory(catalog: CatalogProtocol, name: str) -> bool:
        dataset = catalog.get(name, fallback_to_runtime_pattern=True)
        return bool(getattr(dataset, "_EPHEMERAL", False))

    def _run_on(self, client: Client, pipeline: Pipeline, catalog: CatalogProtocol, run_id: str | None) -> None:
        nodes = pipeline.nodes  # topologically sorted: every upstream future exists before its readers
        dependencies = pipeline.node_dependencies
        produced = pipeline.all_outputs()
        handed_over = {name for name in pipeline.datasets() if name in produced and self._is_memory(catalog, name)}
        free_memory_outputs = handed_over & pipeline.outputs()
        readers_left = {n: 0 for n in nodes}
        for node in nodes:
            for parent in dependencies[node]:
                readers_left[parent] += 1

        token = uuid.uuid4().hex[:8]
        futures: dict[Node, Any] = {}
        node_of_key: dict[str, Node] = {}
        for node in nodes:
            datasets = {
                name: catalog.get(name, fallback_to_runtime_pattern=True)
                for name in [*node.inputs, *node.outputs]
                if name not in handed_over
            }
            memory_outputs = [name for name in node.outputs if name in handed_over]
            upstream = {parent.name: futures[parent] for parent in dependencies[node]}
            key = f"{node.name}-{token}"
            futures[node] = client.submit(
                run_node_task, node, datasets, memory_outputs, upstream, self._is_async, run_id, key=key, pure=False
            )
            node_of_key[key] = node
        keep = {node: futures[node] for node in nodes if set(node.outputs) & free_memory_outputs}

        pending = set(futures.values())
        done_nodes: set[Node] = set()
        no_workers_since: float | None = None
        try:
            while pending:
                try:
                    finished, pending = wait(pending, timeout=_POLL_SECONDS, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    no_workers_since = self._check_workers(client, no_workers_since)
                    continue
                for future in finished:
                    node = node_of_key[future.key]
                    self._raise_if_failed(future, node)
                    done_nodes.add(node)
                    self._logger.info("Completed node: %s", node.name)
                    self._logger.info("Completed %d out of %d tasks", len(done_nodes), len(nodes))
                    for parent in dependencies[node]:  # every reader done: let Dask free the result
                        readers_left[parent] -= 1
                        if readers_left[parent] == 0:
                            futures.pop(parent, None)
                    if readers_left[node] == 0:
                        futures.pop(node, None)
        except BaseException:
            client.cancel(list(pending))
            self._suggest_resume_scenario(pipeline, done_nodes, catalog)
            raise
        for node, future in keep.items():  # memory outputs nobody read: into this run's catalog
            outputs = future.result(timeout=float(self.settings["no_workers_timeout"]))
            for name in set(node.outputs) & free_memory_outputs:
                catalog.save(name, outputs[name])

    def _raise_if_failed(self, future, node: Node) -> None:
        """Raise a failed node's error here. A finished node's result is not fetched: it stays on
        its worker for the tasks that read it (fetching it would also block on a dead worker)."""
        if future.status == "cancelled":
            raise RuntimeError(f"the Dask scheduler cancelled node {node.name!r} (was the cluster shut down?)")
        if future.status != "error":
            return
        try:
            future.result()
        except KilledWorker as error:
            raise RuntimeError(
                f"node {node.name!r} was running on Dask workers that died too often (dask's "
                f"distributed.scheduler.allowed-failures): {error}. Outputs it had not finished are "
                "not written (model folders are only swapped in once complete)."
            ) from error

    def _check_workers(self, client: Client, since: float | None) -> float | None:
        if client.scheduler_info()["workers"]:
            return None
        now = time.monotonic()
        since = since if since is not None else now
        waited = now - since
        if waited > float(self.settings["no_workers_timeout"]):
            raise RuntimeError(
                f"the Dask cluster has had no worker for {waited:.0f} s (dask.no_workers_timeout); "
                "unfinished nodes were cancelled"
            )
        if waited == 0:
            self._logger.warning("the Dask cluster has no worker; waiting for one")
        return since
