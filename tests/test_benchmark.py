from fsad_pipeline.benchmark import markdown_table, summarise


def _run(k, seed, auroc):
    return {
        "k_shot": k, "seed": seed, "image_auroc": auroc, "image_auroc_per_defect_type": {"local": auroc - 0.1},
        "pixel_auroc": None, "train_seconds": 100.0 + seed, "score_images_per_second": 9.0,
        "peak_rss_gib": 1.5, "wall_seconds": 200.0,
    }


def test_summary_mean_and_std():
    rows = summarise([_run(2, 0, 0.8), _run(2, 1, 0.6), _run(1, 0, 0.5)])
    assert [r["k_shot"] for r in rows] == [1, 2]
    mean, std = rows[1]["image_auroc"]
    assert abs(mean - 0.7) < 1e-9 and abs(std - 0.1) < 1e-9
    assert abs(rows[1]["image_auroc_local"][0] - 0.6) < 1e-9
    table = markdown_table(rows)
    assert "| 2 | 2 | 0.700 ± 0.100 |" in table


def test_fleet_table_shows_speed_up_cost_and_memory_per_worker():
    from fsad_pipeline.benchmark import fleet_markdown

    common = {"categories": ["a", "b"], "total_peak_rss_gib": 3.0, "load_average_before": 1.0,
              "load_average_after": 2.0}
    rows = [
        {**common, "runner": "SequentialRunner", "workers": 1, "wall_seconds": 100.0, "cpu_seconds": 150.0,
         "worker_peak_rss_gib": [1.5]},
        {**common, "runner": "DaskRunner", "workers": 2, "wall_seconds": 62.5, "cpu_seconds": 170.0,
         "worker_peak_rss_gib": [1.25, 1.2], "speed_up": 1.6},
    ]
    table = fleet_markdown(rows)
    assert "| 2 | DaskRunner | 2 | 62.5 | 1.60 | 31.2 | 85.0 | 1.25, 1.20 | 3.00 | 1.0 / 2.0 |" in table
    assert "| 2 | SequentialRunner | 1 | 100.0 | 1.00 | 50.0 | 75.0 | 1.50 |" in table
