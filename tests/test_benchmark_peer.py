"""The anomalib PatchCore peer: its job from a finished run, the side-by-side table, the skip line,
``--speed`` wiring, and (only where anomalib is installed) a real tiny fit + predict."""

from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest

from fsad_pipeline.benchmark import peer
from fsad_pipeline.benchmark.__main__ import main
from fsad_pipeline.benchmark.peer import (
    ANOMALIB_MISSING,
    advantage,
    job_from_run,
    run_peer,
    speed_markdown,
)


def _fake_run(root, *, working_size=True, mask_root=None):
    """A finished run folder with tiny files: 2 supports, 3 test images (one with a mask)."""
    (root / "data" / "02_intermediate").mkdir(parents=True)
    (root / "data" / "07_model_output").mkdir(parents=True)
    (root / "data" / "08_reporting").mkdir(parents=True)
    supports = ["data/01_raw/x/train/good/a.png", "data/01_raw/x/train/good/b.png"]
    (root / "data" / "02_intermediate" / "support_selection.json").write_text(
        json.dumps({"k_shot": 2, "seed": 0, "rounds": [supports, ["data/other.png"]]})
    )
    mask = str(mask_root / "m.png") if mask_root else "data/01_raw/x/ground_truth/bad/c_mask.png"
    (root / "data" / "07_model_output" / "predictions.csv").write_text(
        "path,gt_label,defect_type,mask_path,pred_score\n"
        "data/01_raw/x/test/good/g.png,0,good,,0.1\n"
        f"data/01_raw/x/test/bad/c.png,1,bad,{mask},0.9\n"
        "/abs/test/bad/d.png,1,bad,,0.8\n"
    )
    if working_size:
        (root / "data" / "02_intermediate" / "working_size.json").write_text(
            json.dumps({"image_size": [96, 128], "layout": "keep_aspect", "requested": 128})
        )
    (root / "data" / "08_reporting" / "metrics.json").write_text(
        json.dumps({"image_size": [64, 64], "backbone": "efficientnet_lite0", "train_seconds": 100.0,
                    "score_images_per_second": 2.0, "image_auroc": 0.8, "pixel_auroc": None})
    )
    return root


def test_job_takes_round_zero_supports_the_test_rows_and_the_working_size(tmp_path):
    run = _fake_run(tmp_path / "run")
    job = job_from_run(run)
    base = run.resolve()
    assert job["supports"] == [str(base / "data/01_raw/x/train/good/a.png"), str(base / "data/01_raw/x/train/good/b.png")]
    assert job["test"] == [
        {"path": str(base / "data/01_raw/x/test/good/g.png"), "gt_label": 0, "mask_path": ""},
        {"path": str(base / "data/01_raw/x/test/bad/c.png"), "gt_label": 1,
         "mask_path": str(base / "data/01_raw/x/ground_truth/bad/c_mask.png")},
        {"path": "/abs/test/bad/d.png", "gt_label": 1, "mask_path": ""},
    ]
    assert job["image_size"] == [96, 128]  # working_size.json, not metrics.json
    assert job["backbone"] == "efficientnet_lite0" and job["timm_name"] == "tf_efficientnet_lite0"
    assert job["layers"] == ["blocks.2", "blocks.4"]  # the memory bank's timm stages (2, 3)
    assert job["coreset_ratio"] == 0.1 and job["num_neighbors"] == 9 and job["pretrained"] is True
    json.dumps(job)  # the child reads it from a file


def test_job_falls_back_to_the_metrics_image_size_and_takes_other_stages(tmp_path):
    job = job_from_run(_fake_run(tmp_path / "run", working_size=False), out_indices=[1, 2])
    assert job["image_size"] == [64, 64]
    assert job["layers"] == ["blocks.1", "blocks.2"]


def test_advantage_is_above_one_when_the_project_is_better_in_either_direction():
    assert advantage(10.0, 5.0, True) == 2.0  # img/s, AUROC: ours / peer
    assert advantage(10.0, 5.0, False) == 0.5  # seconds, GiB: peer / ours
    assert advantage(None, 5.0, True) is None
    assert advantage(1.0, float("nan"), True) is None
    assert advantage(1.0, 0.0, True) is None


def test_table_has_both_rows_and_the_advantage_row():
    project = {"train_seconds": 500.0, "score_images_per_second": 2.0, "peak_rss_gib": 3.0, "image_auroc": 0.80,
               "pixel_auroc": None, "wall_seconds": 800.0}
    other = {"fit_seconds": 5.0, "predict_images_per_second": 8.0, "peak_rss_gib": 1.5, "image_auroc": 0.64,
             "pixel_auroc": 0.9, "wall_seconds": 80.0, "anomalib_version": "2.7.0", "backbone": "efficientnet_lite0",
             "layers": ["blocks.2", "blocks.4"], "bank_size": 204, "embeddings": 2048, "setup_seconds": 14.0}
    text = speed_markdown(project, other, title="textile_k2_seed0")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["fsad_pipeline"] == ["500.0", "2.0", "3.00", "0.800", "n/a", "800.0"]
    assert rows["anomalib PatchCore"] == ["5.0", "8.0", "1.50", "0.640", "0.900", "80.0"]
    ratio = next(v for k, v in rows.items() if k.startswith("fsad_pipeline advantage"))
    assert ratio == ["0.01×", "0.25×", "0.50×", "1.25×", "n/a", "0.10×"]
    assert "## textile_k2_seed0" in text and "> 1: fsad_pipeline better" in text


def test_table_without_the_peer_says_it_was_skipped():
    text = speed_markdown({"train_seconds": 1.0}, None)
    assert "anomalib PatchCore |" not in text and "comparison skipped" in text


def test_run_peer_prints_one_line_and_returns_none_without_anomalib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "anomalib", None)  # makes ``import anomalib`` raise ImportError
    assert run_peer({"supports": []}, tmp_path / "peer") is None
    assert capsys.readouterr().out == ANOMALIB_MISSING + "\n"
    assert not (tmp_path / "peer").exists()


def test_speed_mode_runs_the_project_then_writes_speed_json_and_md(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_once(workdir, params, *, env_name=None, log_path=None):
        calls.append(params)
        _fake_run(workdir) if not (workdir / "data" / "08_reporting").exists() else None
        return {"train_seconds": 100.0, "score_images_per_second": 2.0, "image_auroc": 0.8, "wall_seconds": 150.0,
                "peak_rss_gib": 2.5}

    monkeypatch.setattr(peer, "run_once", fake_run_once)
    out = tmp_path / "out"
    assert main(["--speed", "--no-peer", "--ks", "2", "--seeds", "0", "1", "--workdir", str(tmp_path / "work"),
                 "--out", str(out)]) == 0
    assert calls == ["k_shot=2,seed=0", "k_shot=2,seed=1"]
    payload = json.loads((out / "speed.json").read_text())
    assert [r["label"] for r in payload["runs"]] == ["textile_k2_seed0", "textile_k2_seed1"]
    assert payload["runs"][0]["peer"] is None and payload["runs"][0]["project"]["peak_rss_gib"] == 2.5
    text = (out / "speed.md").read_text()
    assert "| fsad_pipeline | 100.0 | 2.0 | 2.50 | 0.800 | n/a | 150.0 |" in text
    assert text in capsys.readouterr().out


def _image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
    return str(path)


def test_real_tiny_fit_and_predict_in_a_child(tmp_path):
    pytest.importorskip("anomalib")
    rng = np.random.default_rng(0)

    def texture():
        return rng.integers(100, 156, (64, 64, 3), dtype=np.uint8)

    supports = [_image(tmp_path / f"s{i}.png", texture()) for i in range(3)]
    test = [{"path": _image(tmp_path / f"g{i}.png", texture()), "gt_label": 0, "mask_path": ""} for i in range(2)]
    for i in range(2):
        image, mask = texture(), np.zeros((64, 64), np.uint8)
        image[20 + 8 * i : 40 + 8 * i, 16:40] = (250, 20, 20)
        mask[20 + 8 * i : 40 + 8 * i, 16:40] = 255
        test.append({"path": _image(tmp_path / f"d{i}.png", image), "gt_label": 1,
                     "mask_path": _image(tmp_path / f"m{i}.png", np.repeat(mask[..., None], 3, axis=2))})
    job = {"supports": supports, "test": test, "image_size": [64, 64], "backbone": "efficientnet_lite0",
           "layers": ["blocks.2", "blocks.4"], "pretrained": True, "coreset_ratio": 0.1, "num_neighbors": 9,
           "batch_size": 2, "seed": 0}
    result = run_peer(job, tmp_path / "peer")
    assert result is not None
    assert result["n_images"] == 4 and result["k_shot"] == 3
    assert result["embeddings"] == 3 * 8 * 8  # stride-8 maps of 64x64 images
    assert result["bank_size"] == int(3 * 8 * 8 * 0.1)
    assert result["image_auroc"] == 1.0
    assert result["pixel_auroc"] > 0.9
    assert result["fit_seconds"] > 0 and result["predict_images_per_second"] > 0
    assert 0 < result["peak_rss_gib"] < 8 and result["wall_seconds"] > result["fit_seconds"]
    assert (tmp_path / "peer" / "peer_result.json").is_file()
