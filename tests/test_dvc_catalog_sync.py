"""dvc.yaml and the Kedro project never drift.

For every stage of the ``dfd`` chain, what DVC believes about the stage is derived here from the
Kedro side and compared both ways:

* ``outs``/``metrics``/``plots`` == the file-backed catalog datasets the stage's nodes write;
* data ``deps`` == the file-backed catalog datasets it reads (its free inputs), plus the raw data
  folder for a stage that opens raw files by path (it reads a dataset holding raw paths);
* ``params`` == the ``params:`` inputs of its nodes (parents absorb children), each under the
  parameter file that defines it, each key present in that file;
* code ``deps`` cover every fsad_pipeline module its nodes and catalog datasets import
  (transitively), and no code dep is unused.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from importlib import import_module
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONF = ROOT / "conf" / "base"
CATALOG_FILE = "conf/base/catalog.yml"

#: Datasets that hold paths of raw images or masks: a stage reading one opens raw files.
RAW_PATH_CARRIERS = {"manifest", "support_selection", "defect_shots", "predictions"}


# --- dvc.yaml ------------------------------------------------------------------------------------


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


@cache
def _dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _dvc_vars() -> dict:
    """The ``vars`` dvc.yaml imports (``file:key`` entries), as one dict."""
    merged: dict = {}
    for entry in _dvc().get("vars", []):
        assert isinstance(entry, str), f"inline vars are not used here: {entry!r}"
        file_name, _, keys = entry.partition(":")
        tree = yaml.safe_load((ROOT / file_name).read_text())
        for key in keys.split(",") if keys else list(tree):
            merged[key] = _lookup(tree, key)
    return merged


def _resolve(text: str) -> str:
    values = _dvc_vars()
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(_lookup(values, m.group(1).strip())), text)


def _names(items: list) -> set[str]:
    return {_resolve(next(iter(item)) if isinstance(item, dict) else item) for item in items}


def _stage(name: str) -> dict:
    return _dvc()["stages"][name]


def _stage_outputs(name: str) -> set[str]:
    stage = _stage(name)
    return set().union(*(_names(stage.get(key, [])) for key in ("outs", "metrics", "plots")))


def _stage_params(name: str) -> set[tuple[str, str]]:
    pairs = set()
    for entry in _stage(name).get("params", []):
        if isinstance(entry, str):  # a bare key means params.yaml
            pairs.add(("params.yaml", entry))
        else:
            for file_name, keys in entry.items():
                pairs.update((file_name, key) for key in keys)
    return pairs


# --- Kedro side ----------------------------------------------------------------------------------


#: DVC stages that are Kedro pipelines of their own, outside the dfd chain (none today:
#: base_training, inference, promotion and fleet are run on demand, see dvc.yaml).
OTHER_STAGES: tuple[str, ...] = ()


@cache
def _stages() -> tuple[str, ...]:
    return (*import_module("fsad_pipeline.pipelines.dfd").DFD_STAGES, *OTHER_STAGES)


@cache
def _pipeline(name: str):
    return import_module(f"fsad_pipeline.pipelines.{name}").create_pipeline()


@cache
def _resolver():
    from kedro.io import CatalogConfigResolver

    catalog = yaml.safe_load((CONF / "catalog.yml").read_text())
    return CatalogConfigResolver(catalog, default_runtime_patterns={"{default}": {"type": "kedro.io.MemoryDataset"}})


def _dataset_config(dataset: str) -> dict:
    return _resolver().resolve_pattern(dataset)


def _file_path(dataset: str) -> str | None:
    path = _dataset_config(dataset).get("filepath")
    return str(PurePosixPath(path)) if path else None


def _kedro_outputs(name: str) -> set[str]:
    return {p for p in map(_file_path, _pipeline(name).all_outputs()) if p}


def _kedro_inputs(name: str) -> set[str]:
    return {p for d in _pipeline(name).inputs() if not d.startswith("params:") and (p := _file_path(d))}


def _reads_raw_files(name: str) -> bool:
    return name == "ingestion" or bool(_pipeline(name).inputs() & RAW_PATH_CARRIERS)


def _raw_root() -> str:
    return str(PurePosixPath(_dvc_vars()["data"]["root"]))


@cache
def _parameter_files() -> dict[str, dict]:
    return {f"conf/base/{p.name}": yaml.safe_load(p.read_text()) or {} for p in sorted(CONF.glob("parameters*.yml"))}


def _kedro_params(name: str) -> set[tuple[str, str]]:
    """(file, key) of the stage's ``params:`` inputs, keys covered by a parent key dropped."""
    keys = {d.removeprefix("params:") for d in _pipeline(name).inputs() if d.startswith("params:")}
    minimal = {k for k in keys if not any(k.startswith(f"{parent}.") for parent in keys)}
    pairs = set()
    for key in minimal:
        files = [f for f, tree in _parameter_files().items() if key.split(".")[0] in tree]
        assert len(files) == 1, f"parameter {key!r} of stage {name} is defined in {files or 'no file'}"
        pairs.add((files[0], key))
    return pairs


# --- code dependencies ---------------------------------------------------------------------------


def _module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _package_of(file: Path) -> list[str]:
    parts = list(file.relative_to(SRC).with_suffix("").parts)
    return parts[:-1]  # a module's package; for __init__.py the package itself


def _imported_modules(file: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(file)
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            modules.add(module)
            modules.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in modules if m.split(".")[0] == "fsad_pipeline"}


def _import_closure(files: list[Path]) -> set[Path]:
    """Every fsad_pipeline source file that importing ``files`` executes (package __init__s included)."""
    seen: set[Path] = set()
    todo = list(files)
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        for module in _imported_modules(file):
            parts = module.split(".")
            for depth in range(1, len(parts) + 1):
                found = _module_file(".".join(parts[:depth]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen


def _is_inert(file: Path) -> bool:
    """A module of docstring and constants only: editing it cannot change a result."""
    for statement in ast.parse(file.read_text()).body:
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue
        if isinstance(statement, ast.ImportFrom) and statement.module == "__future__":
            continue
        if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant):
            continue
        return False
    return True


def _stage_code(name: str) -> set[str]:
    """Repository paths of the modules a stage runs: its own package plus its catalog datasets."""
    roots = list((SRC / "fsad_pipeline" / "pipelines" / name).glob("*.py"))
    datasets = _pipeline(name).all_inputs() | _pipeline(name).all_outputs()
    for dataset in datasets:
        dataset_type = _dataset_config(dataset).get("type", "")
        if dataset_type.startswith("fsad_pipeline."):
            roots.append(_module_file(dataset_type.rsplit(".", 1)[0]))
    return {str(f.relative_to(ROOT).as_posix()) for f in _import_closure(roots) if not _is_inert(f)}


def _covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


# --- tests ---------------------------------------------------------------------------------------


def test_dvc_stages_are_the_dfd_stages_run_by_kedro():
    assert list(_dvc()["stages"]) == list(_stages()), "dvc.yaml needs one stage per dfd stage (chain order), then the others"
    for name, stage in _dvc()["stages"].items():
        assert stage["cmd"] == f"kedro run --pipelines={name}"


@pytest.mark.parametrize(
    "stage", ["ingestion", "synthesis", "training", "memory_bank", "scoring", "evaluation", *OTHER_STAGES]
)
def test_stage_outputs_deps_and_params_match_kedro(stage):
    assert stage in _stages()
    dvc_outputs, kedro_outputs = _stage_outputs(stage), _kedro_outputs(stage)
    assert kedro_outputs - dvc_outputs == set(), f"{stage}: file outputs missing from dvc.yaml"
    assert dvc_outputs - kedro_outputs == set(), f"{stage}: dvc.yaml outputs the Kedro stage never writes"

    deps = _names(_stage(stage)["deps"])
    data_deps = {d for d in deps if d.startswith("data/") and d != _raw_root()}
    assert _kedro_inputs(stage) - data_deps == set(), f"{stage}: file inputs missing from deps"
    assert data_deps - _kedro_inputs(stage) == set(), f"{stage}: deps on data the Kedro stage never reads"
    assert (_raw_root() in deps) == _reads_raw_files(stage), f"{stage}: raw data folder dep"
    assert CATALOG_FILE in deps, f"{stage}: every stage reads the catalog"

    code_deps = {d for d in deps if d.startswith("src/")}
    code = _stage_code(stage)
    uncovered = {f for f in code if not any(_covers(d, f) for d in code_deps)}
    assert uncovered == set(), f"{stage}: modules it runs that no dep covers"
    unused = {d for d in code_deps if not any(_covers(d, f) for f in code)}
    assert unused == set(), f"{stage}: code deps it never imports"
    assert deps - data_deps - code_deps - {CATALOG_FILE, _raw_root()} == set(), f"{stage}: unexplained deps"

    assert _stage_params(stage) == _kedro_params(stage), f"{stage}: params differ from the nodes' params: inputs"


def test_every_dvc_param_exists_in_its_file():
    for stage in _dvc()["stages"]:
        for file_name, key in _stage_params(stage):
            path = ROOT / file_name
            assert path.is_file(), f"{stage}: parameter file {file_name} does not exist"
            try:
                _lookup(yaml.safe_load(path.read_text()), key)
            except KeyError:
                pytest.fail(f"{stage}: {file_name} has no parameter {key!r}")


def test_every_file_output_of_the_dfd_pipeline_is_tracked_once():
    dfd = import_module("fsad_pipeline.pipelines.dfd").create_pipeline()
    kedro = {p for p in map(_file_path, dfd.all_outputs()) if p} | set().union(*map(_kedro_outputs, OTHER_STAGES))
    declared = [
        _resolve(next(iter(item)) if isinstance(item, dict) else item)
        for stage in _dvc()["stages"].values()
        for key in ("outs", "metrics", "plots")
        for item in stage.get(key, [])
    ]
    assert len(declared) == len(set(declared)), "an output is declared twice"
    assert kedro == set(declared)


def test_reports_are_metrics_and_plots():
    evaluation, scoring = _stage("evaluation"), _stage("scoring")
    assert _names(evaluation["metrics"]) == {"data/08_reporting/metrics.json"}
    assert "data/08_reporting/roc_curve.csv" in _names(evaluation["plots"])
    assert "data/07_model_output/predictions.csv" in _names(scoring["plots"])
    for stage in _dvc()["stages"].values():  # cached, so `dvc push/pull` carry them (data/ is not in git)
        for item in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            if isinstance(item, dict):
                assert next(iter(item.values())).get("cache", True), item


# --- the checks themselves must be able to fail ----------------------------------------------------


def test_checks_catch_drift(monkeypatch):
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stages["scoring"]["outs"].remove("data/07_model_output/anomaly_maps.npy")
    stages["training"]["deps"].remove("src/fsad_pipeline/models")
    stages["memory_bank"]["params"][1]["conf/base/parameters_memory_bank.yml"].remove("support_augmentation")
    stages["evaluation"]["params"][0]["conf/base/parameters.yml"].append("no_such_key")
    stages["evaluation"]["outs"].append("data/07_model_output/predictions.csv")  # also scoring's plot
    broken = {**_dvc(), "stages": stages}
    monkeypatch.setitem(globals(), "_dvc", lambda: broken)
    with pytest.raises(AssertionError, match="file outputs missing from dvc.yaml"):
        test_stage_outputs_deps_and_params_match_kedro("scoring")
    with pytest.raises(AssertionError, match="no dep covers"):
        test_stage_outputs_deps_and_params_match_kedro("training")
    with pytest.raises(AssertionError, match="params differ"):
        test_stage_outputs_deps_and_params_match_kedro("memory_bank")
    with pytest.raises(pytest.fail.Exception, match="no_such_key"):
        test_every_dvc_param_exists_in_its_file()
    with pytest.raises(AssertionError, match="declared twice"):
        test_every_file_output_of_the_dfd_pipeline_is_tracked_once()


# --- the fleet's dataset factories ---------------------------------------------------------------


def _file_entries(file_name: str) -> dict[str, dict]:
    catalog = yaml.safe_load((CONF / file_name).read_text())
    return {name: entry for name, entry in catalog.items() if isinstance(entry, dict) and "filepath" in entry}


def test_every_file_backed_dfd_dataset_has_its_fleet_factory():
    """The fleet pipeline namespaces the dfd chain per category: each file-backed dfd dataset needs a
    ``{category}.<name>`` factory (same type and options, the file under ``data/<layer>/{category}/``),
    or the fleet would silently keep it in memory. Fleet outputs are not DVC stages (the categories
    are only known at run time), so they are checked here instead of against dvc.yaml."""
    from fsad_pipeline.pipelines.dfd.pipeline import create_pipeline

    in_dfd = create_pipeline().datasets()
    dfd = {name: entry for name, entry in _file_entries("catalog.yml").items() if name in in_dfd}
    fleet = _file_entries("catalog_fleet.yml")
    for name, entry in dfd.items():
        factory = fleet.get(f"{{category}}.{name}")
        assert factory is not None, f"catalog_fleet.yml lacks '{{category}}.{name}'"
        layer, rest = entry["filepath"].split("/", 2)[1:]
        assert factory["filepath"] == f"data/{layer}/{{category}}/{rest}", name
        assert {k: v for k, v in factory.items() if k != "filepath"} == {k: v for k, v in entry.items() if k != "filepath"}, name
    extra = {n for n in fleet if n.startswith("{category}.")} - {f"{{category}}.{n}" for n in dfd}
    assert not extra, f"fleet factories without a dfd dataset: {sorted(extra)}"
