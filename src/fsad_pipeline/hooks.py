"""Project hooks: the parameters the ``fleet`` pipeline needs before and after Kedro builds it.

Kedro builds pipelines (``register_pipelines``) before it creates the catalog, so the fleet's
``create_pipeline`` cannot read parameters from a catalog. The session does create the context
(and fires ``after_context_created``) just before it builds the requested pipelines, so
:class:`FleetHooks` keeps that context's config loader: the fleet is then built from the same
parameters as the run, ``--env`` and ``--params`` included. After the catalog exists, the hook adds
each category's namespaced ``params:<category>.data`` (see ``fsad_pipeline.data.fleet``).

:class:`NodeTimingHooks` profiles every run: seconds and RSS per node, logged as one table at the
end and written to ``data/08_reporting/node_timings.json`` (``FSAD_NODE_TIMINGS=0`` turns it off).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from kedro.framework.hooks import hook_impl

from fsad_pipeline.data.fleet import fleet_plan

try:  # POSIX only: peak RSS of the process and of its children
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

_active_config_loader: Any = None


def active_parameters() -> dict[str, Any] | None:
    """The parameters of the context the running session created (``None`` outside a session)."""
    if _active_config_loader is None:
        return None
    return _active_config_loader["parameters"]


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``params:<prefix>`` and, like Kedro does for nested parameters, every ``params:<prefix>.<key>``."""
    entries = {f"params:{prefix}": value}
    if isinstance(value, dict):
        for key, item in value.items():
            entries.update(_flatten(f"{prefix}.{key}", item))
    return entries


class FleetHooks:
    """Hand the run's parameters to the fleet pipeline and give each category its ``data``."""

    @hook_impl
    def after_context_created(self, context) -> None:
        global _active_config_loader
        _active_config_loader = context.config_loader

    @hook_impl
    def after_catalog_created(self, catalog, parameters: dict[str, Any]) -> None:
        # Kedro passes the catalog's parameter entries: the whole dictionary is under "parameters".
        try:
            plan = fleet_plan(parameters["parameters"])
        except Exception as error:  # noqa: BLE001 - only the fleet needs this; other runs go on
            logger.debug("no fleet parameters added to the catalog: %s", error)
            return
        for category, data in plan.items():
            for name, value in _flatten(f"{category}.data", data).items():
                catalog[name] = value


# --------------------------------------------------------------------------------------------
# Per-node profile of every run
# --------------------------------------------------------------------------------------------

#: Where :class:`NodeTimingHooks` writes the profile, relative to the run's project path.
NODE_TIMINGS_PATH = Path("data") / "08_reporting" / "node_timings.json"
#: ``FSAD_NODE_TIMINGS=0`` (or ``false``/``no``/``off``) turns the profile off.
NODE_TIMINGS_ENV = "FSAD_NODE_TIMINGS"
_GIB = 2**30


def _timings_enabled() -> bool:
    """Whether the node profile is on (it is unless ``FSAD_NODE_TIMINGS`` says 0/false/no/off)."""
    return os.environ.get(NODE_TIMINGS_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def _rss_bytes() -> int:
    """This process's resident set size now."""
    return psutil.Process().memory_info().rss


def _max_rss_bytes(children: bool = False) -> int | None:
    """Peak RSS of this process, or (``children``) of its largest finished child process.

    ``ru_maxrss`` is in KiB on Linux and in bytes on macOS; ``None`` where ``resource`` is missing.
    """
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / _GIB, 4)


@dataclass
class _RunProfile:
    """What one run has measured so far (guarded by :attr:`NodeTimingHooks._lock`)."""

    pipeline: str
    project_path: Path
    started: float
    starts: dict[str, float] = field(default_factory=dict)
    nodes: list[dict[str, Any]] = field(default_factory=list)


def _pipeline_label(run_params: dict[str, Any]) -> str:
    """The run's pipeline names joined by commas (``__default__`` when none was given)."""
    names = run_params.get("pipeline_names") or run_params.get("pipeline_name") or ["__default__"]
    return ",".join([names] if isinstance(names, str) else list(names))


def format_node_table(nodes: list[dict[str, Any]], total_seconds: float) -> str:
    """The profile as a text table (node, seconds, share of ``total_seconds``, RSS after), slowest first."""
    rows = sorted(nodes, key=lambda row: row["seconds"], reverse=True)
    width = max([len("node"), *(len(row["node"]) for row in rows)])
    lines = [f"{'node':<{width}}  {'seconds':>9}  {'share':>6}  {'RSS GiB':>7}"]
    for row in rows:
        share = 100.0 * row["seconds"] / total_seconds if total_seconds > 0 else 0.0
        rss = f"{row['rss_gib']:.2f}" if row.get("rss_gib") is not None else "-"
        lines.append(f"{row['node']:<{width}}  {row['seconds']:>9.2f}  {share:>5.1f}%  {rss:>7}")
    return "\n".join(lines)


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(payload, file, indent=2)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class NodeTimingHooks:
    """Seconds and RSS per node of every ``kedro run``: one INFO table, and ``node_timings.json``.

    * ``seconds``: the node function, ``before_node_run`` to ``after_node_run`` (``time.perf_counter``);
      loading and saving its datasets are outside it but inside ``total_seconds``, the wall time of
      the whole pipeline (``before_pipeline_run`` to ``after_pipeline_run``). Shares are of that
      total (under the ThreadRunner, nodes overlap and shares may add up to more than 100 %).
    * ``rss_gib``: this process's RSS right after the node; ``peak_rss_gib`` (per node: so far; at
      the top: the run's): ``ru_maxrss`` of this process (never below an RSS it saw);
      ``peak_rss_children_gib``: ``ru_maxrss`` of its largest finished child process.
    * Nodes that fail get no record (the run's error is Kedro's to report).
    * Runs are kept apart by ``run_id``, so node hooks of a run this process did not start (the
      DaskRunner's worker processes build their own hooks from the settings) do nothing: there the
      file lists no nodes, only the pipeline's wall time and this process's peaks.
    * ``FSAD_NODE_TIMINGS=0`` turns it off. A file that cannot be written is a warning, never an error.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        """``clock``: seconds from an arbitrary origin (``time.perf_counter``; tests pass a fake)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str | None, _RunProfile] = {}
        self._project_path: Path | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self._project_path = Path(context.project_path)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if not _timings_enabled():
            return
        project_path = run_params.get("project_path") or self._project_path or Path.cwd()
        profile = _RunProfile(_pipeline_label(run_params), Path(project_path), self._clock())
        with self._lock:
            self._runs[run_params.get("run_id")] = profile

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool, run_id: str) -> None:
        started = self._clock()
        with self._lock:
            profile = self._runs.get(run_id)
            if profile is not None:
                profile.starts[node.name] = started

    @hook_impl
    def after_node_run(self, node, catalog, inputs: dict[str, Any], outputs: dict[str, Any], is_async: bool, run_id: str) -> None:
        finished = self._clock()
        with self._lock:
            profile = self._runs.get(run_id)
            started = profile.starts.pop(node.name, None) if profile is not None else None
        if started is None:
            return
        rss = _rss_bytes()
        peak = _max_rss_bytes()  # the kernel updates it lazily: never report it below the RSS now
        record = {
            "node": node.name,
            "seconds": round(finished - started, 4),
            "rss_gib": _gib(rss),
            "peak_rss_gib": _gib(rss if peak is None else max(peak, rss)),
        }
        with self._lock:
            profile.nodes.append(record)

    @hook_impl
    def on_node_error(self, error: Exception, node, catalog, inputs: dict[str, Any], is_async: bool, run_id: str) -> None:
        with self._lock:
            profile = self._runs.get(run_id)
            if profile is not None:
                profile.starts.pop(node.name, None)

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline, catalog) -> None:
        with self._lock:
            self._runs.pop(run_params.get("run_id"), None)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], run_result, pipeline, catalog) -> None:
        with self._lock:
            profile = self._runs.pop(run_params.get("run_id"), None)
        if profile is None:
            return
        payload = self._document(profile, self._clock() - profile.started)
        logger.info(
            "Node timings of %s (%.1f s in all, peak RSS %s GiB):\n%s",
            payload["pipeline"],
            payload["total_seconds"],
            payload["peak_rss_gib"],
            format_node_table(payload["nodes"], payload["total_seconds"]) if payload["nodes"]
            else "(no node ran in this process)",
        )
        target = profile.project_path / NODE_TIMINGS_PATH
        try:
            write_json_atomically(target, payload)
        except OSError as error:
            logger.warning("could not write the node timings to %s: %s", target, error)

    @staticmethod
    def _document(run: _RunProfile, total_seconds: float) -> dict[str, Any]:
        """The JSON document of a finished run (nodes in the order they finished)."""
        peaks = [row["peak_rss_gib"] for row in run.nodes]
        own = _gib(_max_rss_bytes())
        return {
            "pipeline": run.pipeline,
            "total_seconds": round(total_seconds, 4),
            "peak_rss_gib": max([p for p in (own, *peaks) if p is not None], default=None),
            "peak_rss_children_gib": _gib(_max_rss_bytes(children=True)),
            "nodes": list(run.nodes),
        }


class TorchThreadsHooks:
    """Size torch's CPU thread pool from the ``threads`` parameter once the run's context exists.

    ``threads: auto`` (the default) is what this process may really run on: its affinity mask
    capped by the cgroup CPU quota (:mod:`fsad_pipeline.threads`), not the host's core count.
    The DaskRunner's workers set their own count (``dask.torch_threads``).
    """

    @hook_impl
    def after_context_created(self, context) -> None:
        from fsad_pipeline.threads import configure_torch_threads

        try:
            setting = context.params.get("threads", "auto")
        except Exception as error:  # noqa: BLE001 - a broken conf fails later with its own message
            logger.debug("threads parameter not read: %s", error)
            return
        configure_torch_threads(setting)
