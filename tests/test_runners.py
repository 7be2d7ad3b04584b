"""DaskRunner on toy pipelines and an in-process LocalCluster: ordering, hand-offs, errors, settings."""

from __future__ import annotations

import pytest
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import DataCatalog
from kedro.pipeline import Pipeline, node
from kedro_datasets.json import JSONDataset

from fsad_pipeline.runners import DEFAULTS, DaskRunner, resolve_dask_settings


def test_settings_precedence(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    monkeypatch.delenv("DASK_N_WORKERS", raising=False)
    assert resolve_dask_settings({}, None) == DEFAULTS
    params = {"scheduler_address": "tcp://params:1", "n_workers": 3, "dashboard_address": None}
    assert resolve_dask_settings({}, params)["scheduler_address"] == "tcp://params:1"
    assert resolve_dask_settings({}, params)["dashboard_address"] is None  # null in YAML switches it off
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://env:2")
    monkeypatch.setenv("DASK_N_WORKERS", "5")
    settings = resolve_dask_settings({}, params)
    assert settings["scheduler_address"] == "tcp://env:2" and settings["n_workers"] == 5
    settings = resolve_dask_settings({"scheduler_address": "tcp://arg:3", "n_workers": 1}, params)
    assert settings["scheduler_address"] == "tcp://arg:3" and settings["n_workers"] == 1


def _double(x: list) -> list:
    return [2 * v for v in x]


def _add(a: list, b: list) -> list:
    return [u + v for u, v in zip(a, b)]


def _fail(x: list) -> list:
    raise ArithmeticError("broken node")


@pytest.fixture(scope="module")
def in_process_runner():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    client = Client(cluster)
    yield DaskRunner(client=client, torch_threads=2)
    client.close()
    cluster.close()


def test_memory_and_file_hand_offs_respect_dependencies(in_process_runner, tmp_path):
    pipeline = Pipeline([
        node(_double, "x", "doubled", name="double"),               # memory -> memory
        node(_double, "doubled", "on_disk", name="to_disk"),        # memory -> file
        node(_add, ["on_disk", "doubled"], "total", name="add"),     # file + memory -> free memory output
    ])
    catalog = DataCatalog({"on_disk": JSONDataset(filepath=str(tmp_path / "on_disk.json"))})
    catalog["x"] = [1, 2]
    outputs = in_process_runner.run(pipeline, catalog, _create_hook_manager())
    assert JSONDataset(filepath=str(tmp_path / "on_disk.json")).load() == [4, 8]
    assert outputs["total"].load() == [6, 12]  # came back from the worker into the run's catalog


def test_a_failing_node_raises_its_own_error(in_process_runner):
    pipeline = Pipeline([node(_double, "x", "y", name="ok"), node(_fail, "y", "z", name="broken")])
    catalog = DataCatalog()
    catalog["x"] = [1]
    with pytest.raises(ArithmeticError, match="broken node"):
        in_process_runner.run(pipeline, catalog, _create_hook_manager())
