"""Issue 18, the retraining job: a meaningless --tolerance is refused, a rejected challenger is not
compared again on the same data, and the frozen validation set is frozen at the first promotion
from the champion's data (never silently re-frozen).

The DVC run, the export and the scoring are faked (the real chain: tests/pipelines/test_retrain.py);
what is tested is the decision logic of :func:`fsad_pipeline.retrain.retrain`.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from fsad_pipeline import retrain as retrain_module
from fsad_pipeline.retrain import parse_tolerance, retrain


# ------------------------------------------------------------------ defect 7: --tolerance
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1.5", "-2"])
def test_a_meaningless_tolerance_is_refused_at_argument_parsing(text):
    with pytest.raises(argparse.ArgumentTypeError, match="tolerance"):
        parse_tolerance(text)


@pytest.mark.parametrize("text, value", [("0", 0.0), ("0.02", 0.02), ("-1", -1.0), ("1", 1.0)])
def test_a_meaningful_tolerance_is_accepted(text, value):
    assert parse_tolerance(text) == value


def test_fsad_retrain_refuses_tolerance_nan_before_doing_anything(tmp_path, capsys):
    from fsad_pipeline.console import retrain_main

    with pytest.raises(SystemExit) as exit_info:
        retrain_main(["--project", str(tmp_path), "--tolerance", "nan"])
    assert exit_info.value.code == 2
    assert "tolerance" in capsys.readouterr().err and not (tmp_path / "models").exists()


def test_retrain_refuses_a_nan_tolerance_from_python_too(tmp_path):
    with pytest.raises(ValueError, match="tolerance"):
        retrain(tmp_path, tolerance=math.nan)


# ------------------------------------------------------------------ the decision logic, DVC and scoring faked
class FakeProject:
    """Patches :mod:`fsad_pipeline.retrain` so that ``retrain`` runs without Kedro or DVC: the raw
    data fingerprint is ``self.fingerprint``, "dvc repro" counts its calls, the challenger is the
    tiny real bundle and its validation set ``self.validation``; each bundle scores ``self.aurocs``
    (by data fingerprint) on the frozen set, whose size is recorded."""

    def __init__(self, monkeypatch, tmp_path, parts):
        from fsad_pipeline.model_store import champion_challenger
        from fsad_pipeline.model_store.bundle import export_bundle, read_manifest

        self.root = tmp_path / "project"
        self.root.mkdir()
        self.fingerprint, self.repro_calls, self.aurocs, self.scored_sizes = "data-1", 0, {}, []
        rng = np.random.default_rng(0)
        self.validation = _sample_set(rng, 6, parts["image_size"])
        params = {"model_store": {"root": "models"}, "data": {}, "config_version": 1}
        monkeypatch.setattr(retrain_module, "_parameters", lambda project: params)
        monkeypatch.setattr(retrain_module, "current_data_fingerprint", lambda project, data: self.fingerprint)

        def repro(project, command):
            self.repro_calls += 1
            return 0.0

        def export(project, params_, target, fingerprint):
            export_bundle(target, dfd_model=parts["dfd_model"], patch_scorers=parts["patch_scorers"],
                          fusion=parts["fusion"], support_images=parts["support_images"], config_version=1,
                          metrics={}, data_fingerprint=fingerprint)

        def score(bundle_dir, validation, device="cpu"):
            self.scored_sizes.append(validation.images.shape[1:3])
            return {"image_auroc": self.aurocs[read_manifest(bundle_dir)["data_fingerprint"]], "images": len(validation)}

        monkeypatch.setattr(retrain_module, "_run_dvc_repro", repro)
        monkeypatch.setattr(retrain_module, "_export_challenger", export)
        monkeypatch.setattr(retrain_module, "_load_candidate_validation", lambda project: self.validation)
        monkeypatch.setattr(champion_challenger, "bundle_validation_auroc", score)

    def run(self, **options) -> dict:
        return retrain(self.root, **options)


def _sample_set(rng, count, size):
    from fsad_pipeline.synthesis.anomalies import PseudoAnomalySet

    images = rng.integers(0, 255, (count, size, size, 3), dtype=np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    masks[1::2, 2:6, 2:6] = 1
    return PseudoAnomalySet(images.copy(), images, masks, (np.arange(count) % 2).astype(np.int64),
                            np.zeros(count, np.int64))


@pytest.fixture
def fake(monkeypatch, tmp_path, tiny_model_parts):
    return FakeProject(monkeypatch, tmp_path, tiny_model_parts)


def _records(fake) -> list[dict]:
    folder = fake.root / "models" / "decisions"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


# ------------------------------------------------------------------ defect 6: a rejected challenger is not compared again
def test_a_rejected_challenger_is_not_compared_again_on_the_same_data(fake):
    fake.aurocs = {"data-1": 0.9, "data-2": 0.7}
    assert fake.run()["outcome"] == "promoted"
    fake.fingerprint = "data-2"  # new data, a worse model
    assert fake.run()["outcome"] == "rejected" and fake.repro_calls == 2
    again = fake.run()  # the next scheduled run: same data, same champion
    assert again["outcome"] == "nothing_to_do" and "already rejected" in again["reason"] and fake.repro_calls == 2
    assert [r["outcome"] for r in _records(fake)] == ["promoted", "rejected"]  # no second "rejected" record
    assert fake.run(force=True)["outcome"] == "rejected" and fake.repro_calls == 3  # --force compares again
    fake.fingerprint, fake.aurocs["data-3"] = "data-3", 0.95  # newer data: compared, promoted
    assert fake.run()["outcome"] == "promoted"


# ------------------------------------------------------------------ defect 5: frozen at the first promotion, never re-frozen
def test_the_frozen_set_is_the_first_promotions_and_is_never_refrozen(fake, tiny_model_parts):
    from fsad_pipeline.model_store.champion_challenger import frozen_validation_record, load_frozen_validation
    from fsad_pipeline.pipelines.promotion.nodes import promote_model

    parts = tiny_model_parts
    champion_set = fake.validation
    record = promote_model(
        parts["dfd_model"], parts["patch_scorers"], None, parts["fusion"], parts["support_images"], {"image_auroc": 0.9},
        champion_set, _manifest(), 1, {"enabled": False}, {"root": str(fake.root / "models")},
        {"replace_champion": False, "reason": "first"},
    )
    assert record["froze_validation"] and "v0001" in frozen_validation_record(fake.root / "models")["source"]
    frozen = load_frozen_validation(fake.root / "models")
    np.testing.assert_array_equal(frozen.images, champion_set.images)

    # A retrain whose run made another validation set, at another size: the champion's set is used,
    # brought to the size, and stays on disk as it was.
    fake.validation = _sample_set(np.random.default_rng(9), 4, 48)
    fake.fingerprint, fake.aurocs = "data-2", {_manifest_fingerprint(): 0.9, "data-2": 0.95}
    result = fake.run()
    assert result["outcome"] == "promoted" and not result["validation"]["newly_frozen"]
    assert result["validation"]["images"] == len(champion_set)
    np.testing.assert_array_equal(load_frozen_validation(fake.root / "models").images, champion_set.images)


def _manifest():
    import pandas as pd

    return pd.DataFrame({"path": ["a.png"], "sha256": ["0" * 64]})


def _manifest_fingerprint() -> str:
    from fsad_pipeline.data.manifest import manifest_fingerprint

    return manifest_fingerprint(_manifest())


def test_validation_sets_are_resized_to_a_models_working_size():
    from fsad_pipeline.model_store.champion_challenger import validation_at_size

    validation = _sample_set(np.random.default_rng(1), 4, 32)
    resized = validation_at_size(validation, (64, 48))
    assert resized.images.shape == (4, 64, 48, 3) and resized.masks.shape == (4, 64, 48)
    assert set(np.unique(resized.masks)) <= {0, 1} and resized.masks[1].sum() > 0
    assert validation_at_size(validation, (32, 32)) is validation


def test_a_resized_comparison_set_keeps_every_defect_even_at_the_edge():
    """Cropping to another aspect could cut a defect out of its row (label 1, empty mask): the
    comparison set is resized whole, and a defect pixel survives any downscale."""
    from fsad_pipeline.model_store.champion_challenger import validation_at_size

    validation = _sample_set(np.random.default_rng(2), 4, 64)
    validation.masks[:] = 0
    validation.masks[1::2, 30:31, 0:1] = 1  # one pixel at the left edge
    resized = validation_at_size(validation, (64, 16))
    assert (resized.masks.reshape(4, -1).max(axis=1) == validation.labels).all()


def test_a_looser_tolerance_compares_a_rejected_challenger_again(fake):
    fake.aurocs = {"data-1": 0.9, "data-2": 0.85}
    assert fake.run()["outcome"] == "promoted"
    fake.fingerprint = "data-2"
    assert fake.run(tolerance=0.01)["outcome"] == "rejected"
    assert fake.run(tolerance=0.01)["outcome"] == "nothing_to_do"  # same data, same tolerance
    assert fake.run(tolerance=0.1)["outcome"] == "promoted"  # a looser tolerance is another question


def test_a_failed_comparison_freezes_nothing(fake, monkeypatch):
    """The set is frozen only once the challenger is promoted: a crash before that leaves no set
    frozen from a model that never became champion."""
    from fsad_pipeline.model_store import champion_challenger

    def broken(bundle_dir, validation, device="cpu"):
        raise RuntimeError("scoring crashed")

    monkeypatch.setattr(champion_challenger, "bundle_validation_auroc", broken)
    assert fake.run()["outcome"] == "failed"
    assert champion_challenger.load_frozen_validation(fake.root / "models") is None
