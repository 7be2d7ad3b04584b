"""The results notebook runs top to bottom on a tiny run, and kedro-viz builds every pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsad_pipeline.benchmark import run_once, summarise

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "results_walkthrough.ipynb"


def test_results_notebook_executes_on_a_tiny_run(tiny_project):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # Two real benchmark runs (k = 1 and 2) so the "compare k" section has data, then the
    # notebook reads the k = 2 run's artifacts.
    runs = [run_once(tiny_project.root, f"k_shot={k},seed=0") for k in (1, 2)]
    out = tiny_project.path("data/08_reporting/benchmark")
    out.mkdir(parents=True)
    (out / "benchmark.json").write_text(json.dumps({"runs": runs, "summary": summarise(runs)}))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["FSAD_PROJECT"] = str(tiny_project.root)
    try:
        client = nbclient.NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tiny_project.root)}}
        )
        client.execute()
    finally:
        os.environ.pop("FSAD_PROJECT", None)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "k = 2" in text and "flagged NG" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # heat maps, scorer bars, ROC, AUROC vs k


def test_kedro_viz_build_renders_every_pipeline(tiny_project):
    kedro = Path(sys.executable).with_name("kedro")
    if not kedro.exists():
        pytest.skip("kedro CLI not found next to the interpreter")
    env = {**os.environ, "DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1"}
    result = subprocess.run(
        [str(kedro), "viz", "build"], cwd=tiny_project.root, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    build = tiny_project.path("build")
    assert (build / "index.html").exists()
    from kedro.framework.project import pipelines
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(tiny_project.root)
    expected = set(pipelines)
    rendered = {p.name for p in (build / "api" / "pipelines").iterdir()}
    assert expected <= rendered
    main = json.loads((build / "api" / "main").read_text())
    tags = {t["id"] for t in main["tags"]}
    assert {"ingestion", "synthesis", "training", "memory_bank", "scoring", "evaluation"} <= tags
    task_names = {n["name"] for n in main["nodes"] if n["type"] == "task"}
    assert {"train_dfd_model", "fit_memory_banks", "score_test_images", "compute_metrics"} <= task_names
