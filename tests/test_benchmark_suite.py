"""The real-data suite's bookkeeping: datasets found or skipped, tables, ranking, target check."""

from __future__ import annotations

import json

import pytest

from fsad_pipeline.benchmark.__main__ import main
from fsad_pipeline.benchmark.suite import (
    keep_run,
    ranking,
    run_parameters,
    spearman,
    suite_datasets,
    suite_markdown,
    target_check,
    write_suite,
)


def _record(dataset, k, seed, fused, scorers, plain, validation=None):
    def metrics(value):
        return {"image_auroc": value, "pixel_auroc": None if value is None else value - 0.1, "aupro": None}

    return {
        "dataset": dataset, "k_shot": k, "seed": seed, "fused": metrics(fused),
        "scorers": {name: metrics(value) for name, value in scorers.items()}, "plain": {**metrics(plain), "seconds": 2.0},
        "validation": {name: {"image_auroc": value, "pixel_auroc": None} for name, value in (validation or {}).items()},
        "wall_seconds": 100.0, "train_seconds": 50.0, "score_images_per_second": 4.0, "peak_rss_gib": 1.5,
    }


RUNS = [
    _record("tire", 2, 0, 0.80, {"dfd": 0.70, "knn": 0.78, "winclip": 0.60}, 0.75, {"dfd": 0.9, "knn": 0.8, "winclip": 0.7}),
    _record("tire", 2, 1, 0.70, {"dfd": 0.60, "knn": 0.74, "winclip": 0.62}, 0.65, {"dfd": 0.8, "knn": 0.7, "winclip": 0.6}),
    _record("grid", 1, 0, 0.90, {"dfd": 0.904, "knn": 0.85}, 0.88),
]


def test_tables_give_mean_and_std_over_seeds_for_fused_every_scorer_and_plain():
    table = suite_markdown(RUNS)
    assert "## tire, k = 2 (seeds 0, 1)" in table
    assert "| fused | 0.750 ± 0.050 | 0.650 ± 0.050 | n/a |" in table
    assert "| knn | 0.760 ± 0.020 |" in table
    assert "| plain reference (cosine, top 1 %) | 0.700 ± 0.050 |" in table
    assert "## grid, k = 1 (seeds 0)" in table


def test_ranking_by_validation_and_by_test_with_agreement_and_spearman():
    rank = ranking([r for r in RUNS if r["dataset"] == "tire"])
    assert rank["by_validation"] == ["dfd", "knn", "winclip"]
    assert rank["by_test"] == ["knn", "dfd", "winclip"]  # knn 0.76, dfd 0.65, winclip 0.61
    assert rank["top1_agree"] is False
    assert rank["spearman"] == pytest.approx(0.5)
    table = suite_markdown(RUNS)
    assert "| tire | 2 | dfd 0.850, knn 0.750, winclip 0.650 | knn 0.760, dfd 0.650, winclip 0.610 | no | 0.500 |" in table
    # grid has no validation metrics (older runs): n/a, not an error; two scorers: no Spearman
    assert "| grid | 1 | n/a | dfd 0.904, knn 0.850 | n/a | n/a |" in table


def test_spearman_matches_the_rank_correlation():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_target_check_compares_fused_with_the_best_single_scorer_and_plain():
    tire = target_check([r for r in RUNS if r["dataset"] == "tire"])
    assert tire["best_scorer"] == "knn" and tire["bar"] == pytest.approx(0.76 - 0.005)
    assert tire["met"] is False  # 0.75 < 0.755
    grid = target_check([r for r in RUNS if r["dataset"] == "grid"])
    assert grid["met"] is True and grid["bar"] == pytest.approx(0.899)  # 0.90 >= 0.904 - 0.005
    table = suite_markdown(RUNS)
    assert "| tire | 2 | 0.750 | knn 0.760 | 0.700 | 0.755 | **no** |" in table
    assert "| grid | 1 | 0.900 | dfd 0.904 | 0.880 | 0.899 | yes |" in table
    above_scorers = target_check([_record("x", 1, 0, 0.85, {"dfd": 0.7}, 0.9)])  # the plain floor sets the bar
    assert above_scorers["bar"] == pytest.approx(0.895) and above_scorers["met"] is False


def test_a_scorer_missing_from_a_seed_is_left_out_of_the_bar_and_its_cell_says_so():
    """knn scored only seed 0 (0.97): a mean over one seed against the fused mean over three is no
    comparison, so the bar rests on the scorers every seed has, and the table shows n."""
    group = [
        _record("x", 2, 0, 0.90, {"dfd": 0.88, "knn": 0.97}, 0.80),
        _record("x", 2, 1, 0.90, {"dfd": 0.86}, 0.80),
        _record("x", 2, 2, 0.90, {"dfd": 0.87}, 0.80),
    ]
    check = target_check(group)
    assert check["incomplete"] == ["knn"] and check["best_scorer"] == "dfd"
    assert check["bar"] == pytest.approx(0.87 - 0.005) and check["met"] is True
    assert "0.970 ± 0.000 (n = 1)" in suite_markdown(group)


def test_cost_table_reports_the_run_and_the_reference_seconds():
    assert "| tire | 2 | 100.0 | 50.0 | 4.0 | 1.5 | 2.0 |" in suite_markdown(RUNS)


def test_suite_files_are_written_and_readable(tmp_path):
    write_suite(tmp_path, RUNS[:1], {"ks": [2]})
    payload = json.loads((tmp_path / "suite.json").read_text())
    assert payload["runs"][0]["plain"]["image_auroc"] == 0.75
    assert payload["summary"][0]["methods"]["knn"]["image_auroc"]["mean"] == pytest.approx(0.78)
    assert "plain reference" in (tmp_path / "suite.md").read_text()


def test_datasets_are_found_in_the_shared_folder_and_absent_ones_skipped(tmp_path, capsys):
    (tmp_path / "base_categories" / "tire" / "train" / "good").mkdir(parents=True)
    (tmp_path / "kolektorsdd" / "kolektor").mkdir(parents=True)
    datasets = suite_datasets(tmp_path)
    assert [d.name for d in datasets] == ["textile", "kolektorsdd", "tire"]
    assert datasets[0].params == ""
    assert datasets[1].params == f"data.source=folder,data.root={tmp_path / 'kolektorsdd'},data.category=kolektor"
    assert datasets[2].params == f"data.source=mvtec,data.root={tmp_path / 'base_categories'},data.category=tire"
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and all(line.startswith("[suite] skipping ") for line in printed)  # one line each
    assert [d.name for d in suite_datasets(tmp_path, ["tire", "grid"])] == ["tire"]
    with pytest.raises(ValueError, match="unknown suite datasets"):
        suite_datasets(tmp_path, ["mnist"])


def test_the_command_line_with_no_dataset_found_stops_cleanly(tmp_path):
    assert main(["--suite", "real", "--datasets", "grid", "--shared-data", str(tmp_path), "--out", str(tmp_path / "o")]) == 1


def test_run_parameters_are_the_project_conf_with_the_runtime_overrides(tmp_path):
    import shutil

    from fsad_pipeline.benchmark.runs import PROJECT_ROOT

    shutil.copytree(PROJECT_ROOT / "conf", tmp_path / "conf")
    params = run_parameters(tmp_path, "data.source=mvtec,data.root=/x,data.category=tire,k_shot=4,seed=1")
    assert params["data"]["source"] == "mvtec" and params["data"]["category"] == "tire"
    assert params["data"]["max_pixels"] > 0  # the rest of the data block is kept
    assert params["k_shot"] == 4 and params["memory_bank"]["map_sigma"] > 0


def test_the_deployed_threshold_is_checked_against_the_target_false_alarm_rate():
    """Issue 18: per dataset, the false-alarm rate on good test images at the deployed threshold
    within 0.05 of the target (only where there are enough good test images to tell)."""
    from fsad_pipeline.benchmark.suite import far_check

    def with_decision(record, far, miss, good):
        return {**record, "decision": {"method": "target_fpr", "target_false_alarm_rate": 0.05, "false_alarm_rate": far,
                                       "miss_rate": miss, "good_test_images": good}}

    tire = [with_decision(RUNS[0], 0.06, 0.3, 25), with_decision(RUNS[1], 0.12, 0.2, 25)]
    check = far_check(tire)
    assert check["false_alarm_rate"] == pytest.approx(0.09) and check["miss_rate"] == pytest.approx(0.25)
    assert check["met"] is True and check["methods"] == ["target_fpr"]
    assert far_check([with_decision(RUNS[0], 0.5, 0.1, 25)])["met"] is False
    assert far_check([with_decision(RUNS[2], 0.5, 0.1, 3)])["met"] is None  # 3 good images cannot tell
    assert far_check(RUNS[:1])["met"] is None  # a run without the record
    table = suite_markdown(tire)
    assert "| tire | 2 | target_fpr | 0.090 | 0.050 | 0.250 | 25 | yes |" in table


def test_a_kept_run_holds_every_output_but_the_raw_images(tmp_path):
    project = tmp_path / "textile"
    for relative, text in {"01_raw/textile/a.png": "raw", "06_models/fusion.json": "{}",
                           "08_reporting/metrics.json": "{\"image_auroc\": 0.8}", "05_model_input/01_raw/x": "nested"}.items():
        path = project / "data" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    kept = keep_run(project, tmp_path / "runs" / "textile_k2_seed0")
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        "05_model_input/01_raw/x", "06_models/fusion.json", "08_reporting/metrics.json"]
    (project / "data" / "06_models" / "fusion.json").write_text('{"changed": true}')
    kept = keep_run(project, tmp_path / "runs" / "textile_k2_seed0")  # kept again: replaced, not merged
    assert (kept / "06_models" / "fusion.json").read_text() == '{"changed": true}'


def test_a_failed_run_is_listed_and_the_suite_goes_on_with_todays_conf(tmp_path, monkeypatch):
    """One kedro run failing (an hour into a suite) must not lose the others; a reused workdir
    gets the project's conf again instead of keeping a stale copy."""
    from fsad_pipeline.benchmark import suite

    def fake_run(project, dataset, k, seed, **kwargs):
        if seed == 1:
            raise RuntimeError("kedro run failed (seed=1); see the log\nTraceback ...")
        return _record(dataset.name, k, seed, 0.9, {"dfd": 0.8}, 0.7)

    monkeypatch.setattr(suite, "suite_run", fake_run)
    stale = tmp_path / "work" / "x" / "conf" / "base"
    stale.mkdir(parents=True)
    (stale / "parameters_stale.yml").write_text("k_shot: 99\n")
    runs = suite.run_suite([suite.SuiteDataset("x")], [2], [0, 1, 2], workdir=tmp_path / "work", out=tmp_path / "out")
    assert [r["seed"] for r in runs] == [0, 2]
    written = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert [(f["seed"], f["error"]) for f in written["settings"]["failed"]] == [(1, "kedro run failed (seed=1); see the log")]
    assert not (stale / "parameters_stale.yml").exists() and (stale / "parameters.yml").is_file()
