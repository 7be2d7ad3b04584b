"""How the fleet pipeline is wired (no run): namespaces, shared nodes, parameters, catalog factories."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline

from fsad_pipeline import hooks
from fsad_pipeline.pipelines.fleet import build_fleet_pipeline, create_pipeline
from fsad_pipeline.pipelines.fleet.nodes import gather_fleet_metrics

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_every_category_is_a_namespaced_dfd_chain_sharing_the_texture_bank():
    fleet = build_fleet_pipeline(["screw", "plate"])
    by_namespace: dict[str | None, list[str]] = {}
    for node in fleet.nodes:
        by_namespace.setdefault(node.namespace, []).append(node.name)
    assert sorted(by_namespace[None]) == ["build_texture_bank", "gather_fleet_metrics"]
    assert len(by_namespace["screw"]) == len(by_namespace["plate"]) == 21
    screw = Pipeline([n for n in fleet.nodes if n.namespace == "screw"])
    inputs = screw.inputs()
    assert "texture_bank" in inputs and "params:screw.data" in inputs  # shared bank, own data block
    assert {"params:seed", "params:k_shot", "params:dfd", "params:synthesis"} <= inputs  # the rest is global
    assert "params:data" not in fleet.inputs()
    assert {"screw.dfd_model", "screw.predictions", "plate.metrics"} <= fleet.all_outputs()
    gather = next(n for n in fleet.nodes if n.name == "gather_fleet_metrics")
    assert set(gather.inputs) == {"screw.metrics", "plate.metrics"}


def test_catalog_factories_give_every_category_its_own_files(tmp_path):
    conf = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), base_env="base", default_run_env="base")
    catalog = DataCatalog.from_config(conf["catalog"])
    fleet = build_fleet_pipeline(["screw"])
    for name in fleet.datasets() - {"texture_bank"}:
        if name.startswith("params:"):
            continue
        dataset = catalog.get(name, fallback_to_runtime_pattern=True)
        assert not isinstance(dataset, MemoryDataset), f"{name} would stay in memory"
        described = str(dataset._describe())
        assert "/screw/" in described or name.startswith("fleet_"), (name, described)
    assert "06_models/screw/dfd" in str(catalog.get("screw.dfd_model")._describe())


class _Context:
    def __init__(self, parameters: dict):
        self.config_loader = {"parameters": parameters}


@pytest.fixture
def session_parameters(monkeypatch):
    """What FleetHooks.after_context_created keeps for create_pipeline."""
    def use(parameters: dict) -> None:
        hooks.FleetHooks().after_context_created(_Context(parameters))
    monkeypatch.setattr(hooks, "_active_config_loader", None)
    return use


def test_create_pipeline_reads_the_sessions_parameters(session_parameters):
    data = {"source": "mvtec", "root": "x", "category": "widget"}
    session_parameters({"data": data, "fleet": {"categories": ["a", "b"]}})
    assert {n.namespace for n in create_pipeline().nodes} == {None, "a", "b"}

    session_parameters({"data": data, "fleet": {"categories": ["a.b"]}})
    broken = create_pipeline()  # other pipelines still load; running this one fails clearly
    assert [n.name for n in broken.nodes] == ["fleet_configuration_error"]
    with pytest.raises(ValueError, match="fleet pipeline unavailable: .*namespaces"):
        broken.nodes[0].run({})


def test_hook_adds_each_categorys_namespaced_data_parameters():
    catalog = DataCatalog()
    parameters = {"data": {"source": "mvtec", "root": "x", "category": "widget", "folder": {"split_seed": 0}},
                  "fleet": {"categories": ["a"], "data_overrides": {"a": {"root": "/mnt/a"}}}}
    hooks.FleetHooks().after_catalog_created(catalog, {"parameters": parameters})
    assert catalog.load("params:a.data")["category"] == "a"
    assert catalog.load("params:a.data.root") == "/mnt/a"
    assert catalog.load("params:a.data.folder.split_seed") == 0
    hooks.FleetHooks().after_catalog_created(DataCatalog(), {"parameters": {"seed": 0}})  # no fleet: no error


def test_gather_makes_one_row_per_category():
    metrics = {"image_auroc": 0.75, "pixel_auroc": None, "k_shot": 2, "backbone": "b",
               "scorers": {"dfd": {"image_auroc": 0.7}}, "image_auroc_per_defect_type": {"scratch": 0.8}}
    table, figure = gather_fleet_metrics(screw=metrics, plate={**metrics, "image_auroc": 0.5, "scorers": {}})
    assert table["category"].tolist() == ["screw", "plate"]
    assert table["image_auroc"].tolist() == [0.75, 0.5]
    assert table.loc[0, "image_auroc_dfd"] == 0.7 and table.loc[0, "image_auroc_type_scratch"] == 0.8
    assert list(table.columns[:3]) == ["category", "image_auroc", "pixel_auroc"]
    assert len(figure.axes[0].patches) == 2
