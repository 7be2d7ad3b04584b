from fsad_pipeline.benchmark.base_training import load_parameters, markdown


def _row(target, backbone, k, round_index, image, pixel):
    return {"target": target, "backbone": backbone, "k": k, "round": round_index, "images_per_second": 4.0,
            "knn_image_auroc": image, "knn_pixel_auroc": pixel, "gaussian_image_auroc": image - 0.1,
            "gaussian_pixel_auroc": None}


def test_table_reports_mean_std_and_the_difference_per_target_and_on_average():
    rows = [
        _row("a", "plain", 2, 0, 0.6, 0.9), _row("a", "plain", 2, 1, 0.8, 0.9),
        _row("a", "registered", 2, 0, 0.75, 0.8), _row("a", "registered", 2, 1, 0.75, 0.8),
        _row("b", "plain", 2, 0, 0.5, None), _row("b", "registered", 2, 0, 0.6, None),
    ]
    table = markdown(rows, {"a": {"seconds": 120.0, "selected_epoch": 3}, "b": {"seconds": 60.0, "selected_epoch": 1}})
    assert "| a | 2 | 0.700 ± 0.100 | 0.750 ± 0.000 | +0.050 | 0.900 ± 0.000 | 0.800 ± 0.000 | -0.100 |" in table
    assert "| b | 2 | 0.500 ± 0.000 | 0.600 ± 0.000 | +0.100 | n/a | n/a | n/a |" in table
    assert "| **mean** | 2 | 0.600 | 0.675 | 0.075 |" in table  # mean over targets of the per-target means
    assert "| a | 2.0 | 3 | 4.0 | 4.0 |" in table


def test_parameters_come_from_the_project_conf_with_overrides():
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf" / "base"
    params = load_parameters(conf, ["memory_bank.knn.coreset_ratio=0.01", "base_training.training.epochs=3"])
    assert params["memory_bank"]["knn"]["coreset_ratio"] == 0.01 and params["base_training"]["training"]["epochs"] == 3
    assert params["backbone"] == "efficientnet_lite0" and "support_augmentation" in params
