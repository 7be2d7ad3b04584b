"""dvc.yaml and the Kedro catalog never drift: every file-backed dfd output is tracked, and back."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _catalog_paths() -> set[str]:
    catalog = yaml.safe_load((ROOT / "conf" / "base" / "catalog.yml").read_text())
    return {entry["filepath"] for entry in catalog.values() if isinstance(entry, dict) and "filepath" in entry}


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
