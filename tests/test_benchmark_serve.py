"""The service load test (python -m fsad_pipeline.benchmark --serve) on the tiny model: a real
fsad-serve child process, real httpx clients, bad inputs answered 4xx, a kill and restart midway
that leaves the champion's files unchanged."""

from __future__ import annotations

import json

import pytest

from fsad_pipeline.benchmark.serve import serve_benchmark, serve_targets, tree_digest
from fsad_pipeline.model_store.bundle import export_bundle

pytestmark = pytest.mark.slow


def test_the_load_test_runs_a_real_server_and_survives_a_kill(tmp_path, tiny_model_parts):
    model = tmp_path / "bundle"
    export_bundle(model, config_version=1, metrics={"score_images_per_second": 1.0},
                  **{k: v for k, v in tiny_model_parts.items() if k != "image_size"})
    before = tree_digest(model)
    record = serve_benchmark(model, tmp_path / "out", requests=24, concurrency=(1, 2, 4), bad_every=4, max_batch=4)
    assert [level["concurrency"] for level in record["levels"]] == [1, 2, 4]
    one, killed, four = record["levels"]
    assert one["good_answered"] == 18 and one["statuses"]["200"] == 18  # 6 of 24 are bad inputs
    assert one["n_unexpected"] == 0 and one["errors_5xx"] == 0 and set(one["statuses"]) <= {"200", "415", "422"}
    assert killed["restarted"] and record["restarts"][0]["champion_unchanged"]
    assert four["n_unexpected"] == 0 and four["good_answered"] == 18
    assert record["champion_unchanged"] and tree_digest(model) == before
    assert record["targets"]["bad_inputs_4xx"] and record["targets"]["no_5xx_but_503"]
    saved = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert saved["levels"][0]["p50_ms"] > 0 and "| 1 |" in (tmp_path / "out" / "serve.md").read_text()


def test_targets_read_the_levels():
    level = {"concurrency": 1, "p50_ms": 150.0, "p99_ms": 300.0, "throughput_img_s": 6.0, "errors_5xx": 0,
             "n_unexpected": 0, "rss_growth_mib": 10.0}
    record = {"levels": [level, {**level, "concurrency": 16, "p99_ms": 2500.0}], "restarts": [],
              "champion_unchanged": True, "batch_pipeline_img_s": 5.0}
    targets = serve_targets(record)
    assert targets["p50_one_client_ms<=200"] and targets["throughput_16>=batch"] and not targets["p99_16<=2000ms"]
