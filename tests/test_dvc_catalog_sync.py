"""dvc.yaml and the Kedro catalog never drift: every file-backed dfd output is tracked, and back."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _file_entries(file_name: str) -> dict[str, dict]:
    catalog = yaml.safe_load((ROOT / "conf" / "base" / file_name).read_text())
    return {name: entry for name, entry in catalog.items() if isinstance(entry, dict) and "filepath" in entry}


def _catalog_paths() -> set[str]:
    # Dataset factories ("{category}.manifest": one file per category, decided at run time) are
    # not DVC outputs; they are checked against the entries they mirror below.
    return {entry["filepath"] for name, entry in _file_entries("catalog.yml").items() if "{" not in name}


def _dvc_outputs() -> set[str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    paths = set()
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for item in stage.get(key, []):
                paths.add(next(iter(item)) if isinstance(item, dict) else item)
    return paths


def test_every_catalog_file_is_a_dvc_output_and_back():
    catalog, dvc = _catalog_paths(), _dvc_outputs()
    assert catalog - dvc == set(), f"catalog files not tracked by dvc.yaml: {sorted(catalog - dvc)}"
    assert dvc - catalog == set(), f"dvc.yaml outputs no catalog entry writes: {sorted(dvc - catalog)}"


def test_every_dvc_stage_is_a_kedro_pipeline():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    pipelines = {p.name for p in (ROOT / "src" / "fsad_pipeline" / "pipelines").iterdir() if (p / "pipeline.py").exists()}
    for name, stage in stages.items():
        assert stage["cmd"] == f"kedro run --pipelines={name}" and name in pipelines


def test_every_file_backed_dfd_dataset_has_its_fleet_factory():
    """The fleet pipeline namespaces the dfd chain per category: each file-backed dfd dataset needs a
    ``{category}.<name>`` factory (same type and options, the file under ``data/<layer>/{category}/``),
    or the fleet would silently keep it in memory. Fleet outputs are not DVC stages (the categories
    are only known at run time), so they are checked here instead of against dvc.yaml."""
    dfd = _file_entries("catalog.yml")
    fleet = _file_entries("catalog_fleet.yml")
    for name, entry in dfd.items():
        factory = fleet.get(f"{{category}}.{name}")
        assert factory is not None, f"catalog_fleet.yml lacks '{{category}}.{name}'"
        layer, rest = entry["filepath"].split("/", 2)[1:]
        assert factory["filepath"] == f"data/{layer}/{{category}}/{rest}", name
        assert {k: v for k, v in factory.items() if k != "filepath"} == {k: v for k, v in entry.items() if k != "filepath"}, name
    extra = {n for n in fleet if n.startswith("{category}.")} - {f"{{category}}.{n}" for n in dfd}
    assert not extra, f"fleet factories without a dfd dataset: {sorted(extra)}"
