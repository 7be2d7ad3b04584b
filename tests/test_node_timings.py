"""NodeTimingHooks: seconds and RSS per node, one log table, ``data/08_reporting/node_timings.json``."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import DataCatalog
from kedro.pipeline import Pipeline, node
from kedro.runner import SequentialRunner, ThreadRunner

from fsad_pipeline import hooks
from fsad_pipeline.hooks import NODE_TIMINGS_PATH, FleetHooks, NodeTimingHooks, format_node_table

GIB = 2**30


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _node(name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name)


def _run_params(project: Path | None, run_id: str = "run-1", pipelines: list[str] | None = None) -> dict:
    params = {"run_id": run_id, "pipeline_names": pipelines}
    if project is not None:
        params["project_path"] = project.as_posix()
    return params


def _start(timings: NodeTimingHooks, run_params: dict) -> None:
    timings.before_pipeline_run(run_params=run_params, pipeline=None, catalog=None)


def _finish(timings: NodeTimingHooks, run_params: dict) -> None:
    timings.after_pipeline_run(run_params=run_params, run_result={}, pipeline=None, catalog=None)


def _run_node(timings: NodeTimingHooks, clock: FakeClock, name: str, seconds: float, run_id: str = "run-1") -> None:
    fake = _node(name)
    timings.before_node_run(node=fake, catalog=None, inputs={}, is_async=False, run_id=run_id)
    clock.advance(seconds)
    timings.after_node_run(node=fake, catalog=None, inputs={}, outputs={}, is_async=False, run_id=run_id)


@pytest.fixture(autouse=True)
def _enabled(monkeypatch):
    monkeypatch.delenv("FSAD_NODE_TIMINGS", raising=False)


@pytest.fixture
def fixed_rss(monkeypatch):
    """RSS after each node: 1, 2, 3 ... GiB."""
    values = iter(range(1, 100))
    monkeypatch.setattr(hooks, "_rss_bytes", lambda: next(values) * GIB)


def test_json_lists_nodes_in_run_order_with_seconds_and_rss(tmp_path, fixed_rss, caplog):
    clock = FakeClock()
    timings = NodeTimingHooks(clock=clock)
    params = _run_params(tmp_path, pipelines=["dfd"])
    _start(timings, params)
    clock.advance(0.5)  # loading before the first node: in the total, in no node
    _run_node(timings, clock, "ingest", 1.0)
    _run_node(timings, clock, "train", 6.0)
    _run_node(timings, clock, "report", 2.5)
    with caplog.at_level(logging.INFO, logger="fsad_pipeline.hooks"):
        _finish(timings, params)

    document = json.loads((tmp_path / NODE_TIMINGS_PATH).read_text())
    assert document["pipeline"] == "dfd"
    assert document["total_seconds"] == pytest.approx(10.0)
    assert [row["node"] for row in document["nodes"]] == ["ingest", "train", "report"]
    assert [row["seconds"] for row in document["nodes"]] == pytest.approx([1.0, 6.0, 2.5])
    assert [row["rss_gib"] for row in document["nodes"]] == pytest.approx([1.0, 2.0, 3.0])
    assert document["peak_rss_gib"] > 0.01  # this very process, from getrusage
    assert document["peak_rss_children_gib"] >= 0.0
    assert all(row["peak_rss_gib"] <= document["peak_rss_gib"] for row in document["nodes"])
    assert not [p for p in (tmp_path / NODE_TIMINGS_PATH).parent.iterdir() if p.name.endswith(".tmp")]

    (message,) = [r.getMessage() for r in caplog.records if r.name == "fsad_pipeline.hooks"]
    assert "Node timings of dfd (10.0 s in all" in message
    rows = [line.split() for line in message.splitlines()[2:]]  # header line, then table header
    assert [row[0] for row in rows] == ["train", "report", "ingest"]  # slowest first
    assert rows[0][1:] == ["6.00", "60.0%", "2.00"]
    assert rows[2][1:] == ["1.00", "10.0%", "1.00"]


def test_the_table_is_sorted_and_copes_with_zero_total():
    table = format_node_table([{"node": "a", "seconds": 0.0, "rss_gib": None}, {"node": "bb", "seconds": 0.0, "rss_gib": 1.5}], 0.0)
    lines = table.splitlines()
    assert lines[0].split() == ["node", "seconds", "share", "RSS", "GiB"]
    assert [line.split()[2] for line in lines[1:]] == ["0.0%", "0.0%"]
    assert {line.split()[3] for line in lines[1:]} == {"-", "1.50"}


def test_failed_node_has_no_record_and_the_run_goes_on(tmp_path, fixed_rss):
    clock = FakeClock()
    timings = NodeTimingHooks(clock=clock)
    params = _run_params(tmp_path)
    _start(timings, params)
    _run_node(timings, clock, "ok", 1.0)
    broken = _node("broken")
    timings.before_node_run(node=broken, catalog=None, inputs={}, is_async=False, run_id="run-1")
    timings.on_node_error(error=ValueError("x"), node=broken, catalog=None, inputs={}, is_async=False, run_id="run-1")
    # Kedro does not call after_node_run for a failed node; a stray one must not invent a record.
    timings.after_node_run(node=broken, catalog=None, inputs={}, outputs={}, is_async=False, run_id="run-1")
    _finish(timings, params)
    document = json.loads((tmp_path / NODE_TIMINGS_PATH).read_text())
    assert [row["node"] for row in document["nodes"]] == ["ok"]
    assert document["pipeline"] == "__default__"


def test_a_failed_pipeline_writes_nothing_and_forgets_the_run(tmp_path):
    timings = NodeTimingHooks(clock=FakeClock())
    params = _run_params(tmp_path)
    _start(timings, params)
    timings.on_pipeline_error(error=RuntimeError("x"), run_params=params, pipeline=None, catalog=None)
    _finish(timings, params)  # not called by Kedro after an error; harmless if it were
    assert not (tmp_path / NODE_TIMINGS_PATH).exists()


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_env_var_turns_it_off(tmp_path, monkeypatch, value):
    monkeypatch.setenv("FSAD_NODE_TIMINGS", value)
    clock = FakeClock()
    timings = NodeTimingHooks(clock=clock)
    params = _run_params(tmp_path)
    _start(timings, params)
    _run_node(timings, clock, "a", 1.0)
    _finish(timings, params)
    assert not (tmp_path / NODE_TIMINGS_PATH).exists()


def test_node_hooks_of_a_run_started_elsewhere_do_nothing(tmp_path):
    """The DaskRunner's worker processes build their own hooks: no pipeline run there."""
    clock = FakeClock()
    worker = NodeTimingHooks(clock=clock)
    _run_node(worker, clock, "on_a_worker", 1.0)
    worker.on_node_error(error=ValueError("x"), node=_node("n"), catalog=None, inputs={}, is_async=False, run_id="run-1")
    _finish(worker, _run_params(tmp_path))
    assert not (tmp_path / NODE_TIMINGS_PATH).exists()

    # And the driver, whose node hooks never fire, still writes the pipeline's wall time.
    driver = NodeTimingHooks(clock=clock)
    params = _run_params(tmp_path)
    _start(driver, params)
    clock.advance(3.0)
    _finish(driver, params)
    document = json.loads((tmp_path / NODE_TIMINGS_PATH).read_text())
    assert document["nodes"] == [] and document["total_seconds"] == pytest.approx(3.0)


def test_project_path_falls_back_to_the_context(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "project"
    timings = NodeTimingHooks(clock=FakeClock())
    timings.after_context_created(context=SimpleNamespace(project_path=project))
    params = _run_params(None)
    _start(timings, params)
    _finish(timings, params)
    assert (project / NODE_TIMINGS_PATH).is_file()
    assert not (tmp_path / NODE_TIMINGS_PATH).exists()


def test_an_unwritable_target_is_a_warning(tmp_path, caplog):
    (tmp_path / NODE_TIMINGS_PATH).mkdir(parents=True)  # a folder where the file should go
    timings = NodeTimingHooks(clock=FakeClock())
    params = _run_params(tmp_path)
    _start(timings, params)
    with caplog.at_level(logging.WARNING, logger="fsad_pipeline.hooks"):
        _finish(timings, params)
    assert any("could not write the node timings" in r.getMessage() for r in caplog.records)
    assert [p.name for p in (tmp_path / NODE_TIMINGS_PATH).parent.iterdir()] == ["node_timings.json"]


def test_concurrent_nodes_and_runs_are_kept_apart(tmp_path):
    timings = NodeTimingHooks()
    first, second = _run_params(tmp_path / "a", "run-a"), _run_params(tmp_path / "b", "run-b")
    _start(timings, first)
    _start(timings, second)

    def work(index: int) -> None:
        run_id = "run-a" if index % 2 else "run-b"
        fake = _node(f"node_{index}")
        timings.before_node_run(node=fake, catalog=None, inputs={}, is_async=False, run_id=run_id)
        time.sleep(0.001)
        timings.after_node_run(node=fake, catalog=None, inputs={}, outputs={}, is_async=False, run_id=run_id)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _finish(timings, first)
    _finish(timings, second)
    a = json.loads((tmp_path / "a" / NODE_TIMINGS_PATH).read_text())["nodes"]
    b = json.loads((tmp_path / "b" / NODE_TIMINGS_PATH).read_text())["nodes"]
    assert sorted(int(row["node"].split("_")[1]) for row in a) == list(range(1, 40, 2))
    assert sorted(int(row["node"].split("_")[1]) for row in b) == list(range(0, 40, 2))
    assert all(row["seconds"] >= 0.001 for row in a + b)


def _slow_double(x: list) -> list:
    time.sleep(0.05)
    return [2 * v for v in x]


def _fail(x: list) -> list:
    raise ArithmeticError("broken node")


@pytest.mark.parametrize("runner", [SequentialRunner(), ThreadRunner(max_workers=2)], ids=["sequential", "thread"])
def test_real_kedro_runners_fire_the_hooks(tmp_path, runner):
    """Registered in a real hook manager (pluggy checks the hook_impl signatures against the specs)."""
    manager = _create_hook_manager()
    timings = NodeTimingHooks()
    manager.register(timings)
    pipeline = Pipeline([
        node(_slow_double, "x", "y", name="first"),
        node(_slow_double, "x", "z", name="beside"),
        node(_slow_double, "y", "w", name="after_first"),
    ])
    catalog = DataCatalog()
    catalog["x"] = [1]
    params = _run_params(tmp_path, run_id="real", pipelines=["toy"])
    manager.hook.before_pipeline_run(run_params=params, pipeline=pipeline, catalog=catalog)
    result = runner.run(pipeline, catalog, manager, run_id="real")
    manager.hook.after_pipeline_run(run_params=params, run_result=result, pipeline=pipeline, catalog=catalog)
    document = json.loads((tmp_path / NODE_TIMINGS_PATH).read_text())
    assert {row["node"] for row in document["nodes"]} == {"first", "beside", "after_first"}
    assert all(0.04 < row["seconds"] < 5 for row in document["nodes"])
    order = [row["node"] for row in document["nodes"]]
    assert order.index("first") < order.index("after_first")
    assert all(row["rss_gib"] > 0.01 for row in document["nodes"])


def test_a_failing_node_in_a_real_run_leaves_no_file(tmp_path):
    manager = _create_hook_manager()
    manager.register(NodeTimingHooks())
    pipeline = Pipeline([node(_slow_double, "x", "y", name="ok"), node(_fail, "y", "z", name="broken")])
    catalog = DataCatalog()
    catalog["x"] = [1]
    params = _run_params(tmp_path, run_id="failing")
    manager.hook.before_pipeline_run(run_params=params, pipeline=pipeline, catalog=catalog)
    with pytest.raises(ArithmeticError, match="broken node"):
        SequentialRunner().run(pipeline, catalog, manager, run_id="failing")
    manager.hook.on_pipeline_error(error=ArithmeticError(), run_params=params, pipeline=pipeline, catalog=catalog)
    assert not (tmp_path / NODE_TIMINGS_PATH).exists()


def test_the_project_registers_it_after_the_fleet_hooks():
    from fsad_pipeline import settings

    assert [type(h) for h in settings.HOOKS][:2] == [FleetHooks, NodeTimingHooks]
