"""One real suite entry on the tiny project: a ``kedro run --pipelines=dfd`` plus the plain reference."""

from __future__ import annotations

import json

import pytest

from fsad_pipeline.benchmark.suite import SuiteDataset, suite_markdown, suite_run, write_suite

pytestmark = pytest.mark.slow


def test_a_suite_run_records_fused_every_scorer_and_the_plain_reference(tiny_project, tmp_path):
    record = suite_run(tiny_project.root, SuiteDataset("widget"), 2, 0, log_path=tmp_path / "run.log")
    metrics = json.loads(tiny_project.path("data/08_reporting/metrics.json").read_text())
    assert record["dataset"] == "widget" and record["k_shot"] == 2 and record["params"] == "k_shot=2,seed=0"
    assert record["fused"]["image_auroc"] == metrics["image_auroc"]
    assert set(record["scorers"]) == set(metrics["scorers"]) and "knn" in record["scorers"]
    assert set(record["validation"]) == set((metrics.get("validation") or {}).get("scorers") or {})
    plain = record["plain"]
    assert 0.0 <= plain["image_auroc"] <= 1.0 and plain["pixel_auroc"] is not None and plain["aupro"] is not None
    assert plain["bank_size"] > 0 and plain["seconds"] > 0
    assert record["wall_seconds"] > 0 and record["peak_rss_gib"] > 0
    write_suite(tmp_path / "out", [record], {})
    table = (tmp_path / "out" / "suite.md").read_text()
    assert "## widget, k = 2 (seeds 0)" in table and "| plain reference (cosine, top 1 %) |" in table
    assert record["plain_max"]["image_auroc"] is not None
    assert table == suite_markdown([record])
