import json
import os
import shutil

import numpy as np
import pytest

from fsad_pipeline.model_store.bundle import (
    BUNDLE_FORMAT_VERSION,
    MANIFEST_FILE,
    BundleError,
    BundleMismatchError,
    export_bundle,
    load_bundle,
    verify_bundle,
)
from fsad_pipeline.model_store.store import ModelStore, StoreError, export_and_promote
from fsad_pipeline.scoring.ensemble import assemble
from fsad_pipeline.scoring.fusion import Fusion


def _export(parts, target, **overrides):
    kwargs = dict(
        dfd_model=parts["dfd_model"],
        patch_scorers=parts["patch_scorers"],
        fusion=parts["fusion"],
        support_images=parts["support_images"],
        config_version=1,
        metrics={"image_auroc": 0.75},
        data_fingerprint="abc123",
    )
    kwargs.update(overrides)
    export_bundle(target, **kwargs)
    return target


@pytest.fixture
def bundle_dir(tmp_path, tiny_model_parts):
    return _export(tiny_model_parts, tmp_path / "bundle")


def test_round_trip_scores_exactly_like_the_pipeline_objects(bundle_dir, tiny_model_parts):
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION and manifest["config_version"] == 1
    assert manifest["backbone"] == "efficientnet_lite0" and manifest["image_size"] == [32, 32]
    assert manifest["features"]["dfd"]["target_dim"] == 16 and manifest["features"]["patch_scorers"]["image_size"] == 32
    assert manifest["scorers"] == ["dfd", "knn"] and manifest["threshold"] == tiny_model_parts["fusion"]["threshold"]
    assert manifest["metrics"] == {"image_auroc": 0.75} and manifest["data_fingerprint"] == "abc123"
    assert manifest["created"] and manifest["components"]["classifier"] is None
    assert {"dfd/scorer.json", "fusion.json", "support_images.npy", "patch_scorers/features.json"} <= set(manifest["files"])

    bundle = load_bundle(bundle_dir, expect={"backbone": "efficientnet_lite0", "image_size": 32, "config_version": 1},
                         device="cpu")
    np.testing.assert_array_equal(bundle.support_images, tiny_model_parts["support_images"])
    images = np.random.default_rng(5).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    original = assemble(tiny_model_parts["dfd_model"], tiny_model_parts["patch_scorers"], image_size=32,
                        fusion=Fusion.from_dict(tiny_model_parts["fusion"])).score(images)
    loaded = bundle.ensemble().score(images)
    np.testing.assert_allclose(loaded["pred_score"], original["pred_score"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loaded["anomaly_map"], original["anomaly_map"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "expect, word",
    [({"backbone": "wide_resnet50_2"}, "backbone"), ({"image_size": 256}, "image_size"), ({"config_version": 2}, "config_version")],
)
def test_mismatched_configuration_is_refused(bundle_dir, expect, word):
    with pytest.raises(BundleMismatchError, match=word):
        load_bundle(bundle_dir, expect=expect, device="cpu")
    with pytest.raises(BundleMismatchError, match="retrain"):
        verify_bundle(bundle_dir, expect=expect)


def test_other_format_version_and_unknown_expectations_are_refused(bundle_dir):
    with pytest.raises(ValueError, match="unknown expectation"):
        verify_bundle(bundle_dir, expect={"k_shot": 2})
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BundleMismatchError, match="format version 99"):
        verify_bundle(bundle_dir)


def test_missing_or_changed_files_are_refused(tmp_path, bundle_dir):
    with pytest.raises(BundleError, match="no model at"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="bundle.json is missing"):
        verify_bundle(tmp_path)
    fusion = bundle_dir / "fusion.json"
    fusion.write_text(fusion.read_text().replace("0", "1", 1))
    with pytest.raises(BundleError, match="fusion.json has changed"):
        verify_bundle(bundle_dir)
    assert verify_bundle(bundle_dir, check_files=False)["image_size"] == [32, 32]
    (bundle_dir / "dfd" / "member_0" / "dfd.safetensors").unlink()
    with pytest.raises(BundleError, match="dfd.safetensors is missing"):
        load_bundle(bundle_dir)
    shutil.rmtree(bundle_dir / "patch_scorers")
    with pytest.raises(BundleError, match="patch_scorers component is missing"):
        verify_bundle(bundle_dir)


def test_export_refuses_a_fusion_it_cannot_serve_and_writes_nothing(tmp_path, tiny_model_parts):
    with pytest.raises(BundleError, match="'knn'"):
        _export(tiny_model_parts, tmp_path / "b", patch_scorers=None)
    winclip_fusion = {**tiny_model_parts["fusion"], "scorers": ["dfd", "winclip"]}
    with pytest.raises(BundleError, match="winclip"):
        _export(tiny_model_parts, tmp_path / "b", fusion=winclip_fusion)
    assert not (tmp_path / "b").exists()


class _Classifier:
    """A stand-in with the classifier contract (the real one: classification/defect_types.py DefectTypeClassifiers)."""

    def __init__(self, types=("scratch", "spot")):
        self.types = list(types)

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        (directory / "classes.json").write_text(json.dumps(self.types))

    def predict(self, images, anomaly_maps):
        n = len(images)
        return {"pred_defect_type": np.array([self.types[0]] * n), "pred_defect_probability": np.full(n, 0.9),
                "runner_up_defect_type": np.array([self.types[1]] * n)}


def test_optional_classifier_is_bundled_and_loaded(tmp_path, tiny_model_parts):
    target = _export(tiny_model_parts, tmp_path / "bundle", classifier=_Classifier())
    manifest = verify_bundle(target)
    assert manifest["components"]["classifier"] == "classifier" and "classifier/classes.json" in manifest["files"]
    seen = []
    bundle = load_bundle(target, device="cpu",
                         classifier_loader=lambda d: seen.append(d) or _Classifier(json.loads((d / "classes.json").read_text())))
    assert seen == [target / "classifier"] and bundle.classifier.types == ["scratch", "spot"]


# ------------------------------------------------------------------------------ the store
def test_promote_rollback_and_history(tmp_path, bundle_dir):
    store = ModelStore(tmp_path / "models")
    assert store.current() is None and store.history() == []
    first = store.promote(bundle_dir, {"reason": "first"})
    assert first.version == "v0001" and first.record["previous"] is None and first.record["decision"] == {"reason": "first"}
    assert store.champion_path.is_symlink() and store.champion_path.resolve() == (tmp_path / "models/versions/v0001").resolve()
    assert load_bundle(store.champion_path, device="cpu").promotion["version"] == "v0001"
    assert bundle_dir.exists()  # copied, not moved

    second = store.promote(bundle_dir, {"reason": "better"})
    assert second.version == "v0002" and second.record["previous"] == "v0001"
    assert [(e.version, e.is_current) for e in store.history()] == [("v0001", False), ("v0002", True)]
    verify_bundle(store.versions_dir / "v0001")  # the previous champion is kept intact

    back = store.rollback({"reason": "line complaints"})
    assert back.version == "v0001" and store.current().version == "v0001"
    statuses = {e.version: e.record["status"] for e in store.history()}
    assert statuses == {"v0001": "promoted", "v0002": "rolled_back"}
    with pytest.raises(StoreError, match="nothing to roll back to"):
        store.rollback()
    assert store.rollback(to="v0002").version == "v0002"
    third = store.promote(bundle_dir, {"reason": "retrained"})
    assert third.version == "v0003" and third.record["previous"] == "v0002"
    assert [e["event"] for e in store.events()] == ["promote", "promote", "rollback", "rollback", "promote"]


def test_promotion_refuses_bad_candidates_and_keeps_the_champion(tmp_path, bundle_dir):
    store = ModelStore(tmp_path / "models")
    store.promote(bundle_dir, {})
    with pytest.raises(BundleMismatchError):
        store.promote(bundle_dir, {}, expect={"image_size": 64})
    (bundle_dir / "support_images.npy").write_bytes(b"corrupt")
    with pytest.raises(BundleError, match="changed since export"):
        store.promote(bundle_dir, {})
    assert store.current().version == "v0001" and [e.version for e in store.history()] == ["v0001"]


def _copy_then_crash(candidate, staging, move):
    shutil.copytree(candidate, staging)
    (staging / "dfd" / "member_0" / "dfd.safetensors").unlink()  # half-written copy ...
    raise OSError("disk full")  # ... and the process dies


def test_a_crash_during_promotion_leaves_the_champion_untouched(tmp_path, bundle_dir, monkeypatch):
    store = ModelStore(tmp_path / "models")
    store.promote(bundle_dir, {"reason": "first"})
    champion_files = sorted(p.name for p in store.champion_path.iterdir())

    monkeypatch.setattr(ModelStore, "_stage", staticmethod(_copy_then_crash))
    with pytest.raises(OSError, match="disk full"):
        store.promote(bundle_dir, {"reason": "crashing copy"})
    monkeypatch.undo()

    def crash(self, version):
        raise RuntimeError("killed before the switch")

    monkeypatch.setattr(ModelStore, "_point_champion_to", crash)
    with pytest.raises(RuntimeError, match="killed"):
        store.promote(bundle_dir, {"reason": "crashing switch"})
    monkeypatch.undo()

    assert store.current().version == "v0001" and sorted(p.name for p in store.champion_path.iterdir()) == champion_files
    assert [p.name for p in store.versions_dir.iterdir()] == ["v0001"]  # nothing half-done left behind
    verify_bundle(store.champion_path)
    assert [e["event"] for e in store.events()] == ["promote"]


def test_leftovers_of_a_killed_promotion_are_cleaned_up(tmp_path, bundle_dir):
    store = ModelStore(tmp_path / "models")
    store.promote(bundle_dir, {})
    # A process killed (no exception handling) after staging v0002 but before the switch:
    shutil.copytree(store.versions_dir / "v0001", store.versions_dir / "v0002")
    record = json.loads((store.versions_dir / "v0002" / "promotion.json").read_text())
    (store.versions_dir / "v0002" / "promotion.json").write_text(json.dumps({**record, "status": "staged"}))
    shutil.copytree(bundle_dir, store.versions_dir / ".staging-v0003-999")
    assert store.current().version == "v0001" and [e.version for e in store.history()] == ["v0001"]
    entry = store.promote(bundle_dir, {"reason": "after the crash"})
    assert entry.version == "v0002" and sorted(p.name for p in store.versions_dir.iterdir()) == ["v0001", "v0002"]


def test_export_and_promote_never_silently_replaces_a_champion(tmp_path, tiny_model_parts):
    store = ModelStore(tmp_path / "models")
    kwargs = dict(dfd_model=tiny_model_parts["dfd_model"], patch_scorers=tiny_model_parts["patch_scorers"],
                  fusion=tiny_model_parts["fusion"], support_images=tiny_model_parts["support_images"], config_version=1)
    assert export_and_promote(store, {"reason": "first"}, replace_champion=False, **kwargs).version == "v0001"
    with pytest.raises(StoreError, match="already holds v0001"):
        export_and_promote(store, {"reason": "second"}, replace_champion=False, **kwargs)
    assert export_and_promote(store, {"reason": "forced"}, replace_champion=True, **kwargs).version == "v0002"
    assert not [p for p in store.root.iterdir() if p.name.startswith(".candidate-")]  # scratch moved or removed


def test_an_old_bundles_int_image_size_loads_as_a_square(bundle_dir):
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps({**manifest, "image_size": 32}))
    bundle = load_bundle(bundle_dir, expect={"image_size": 32}, device="cpu")
    assert bundle.image_size == (32, 32) and bundle.ensemble().image_size == (32, 32)
    # An int expectation is the short side of the working size; a pair must match exactly.
    with pytest.raises(BundleMismatchError, match="image_size"):
        verify_bundle(bundle_dir, expect={"image_size": [32, 64]}, check_files=False)
    assert verify_bundle(bundle_dir, expect={"image_size": [32, 32]}, check_files=False)["image_size"] == 32


def test_a_registered_encoder_travels_inside_the_bundle(tmp_path, tiny_model_parts, monkeypatch):
    """A model whose memory-bank features use a registered encoder (base training) scores the
    same after the registry is gone and from another working directory: the encoder is copied
    into the bundle and checksummed like every other file."""
    import dataclasses
    import os
    import shutil

    import torch

    from fsad_pipeline.models.registration import EncoderConfig, STNConfig, build_registration_encoder, save_encoder
    from fsad_pipeline.scoring.patch_scorers import PatchScorerSet

    torch.manual_seed(0)
    encoder, base = build_registration_encoder(EncoderConfig(stn=STNConfig(stages=(1, 2))), pretrained=False)
    registry = tmp_path / "encoders"
    save_encoder(registry / "mine", encoder.eval(), name="mine", mean=base.mean, std=base.std, image_size=32,
                 training={"epochs": 1})
    monkeypatch.setenv("FSAD_ENCODER_REGISTRY", str(registry))
    patch = tiny_model_parts["patch_scorers"]
    registered = PatchScorerSet(dataclasses.replace(patch.features, backbone="registered:mine"), patch.scorers, patch.info)
    parts = {**tiny_model_parts, "patch_scorers": registered}
    manifest = export_bundle(tmp_path / "bundle", config_version=1, data_fingerprint="x",
                             **{k: v for k, v in parts.items() if k != "image_size"})
    assert manifest["encoders"] == {"registered:mine": "encoders/0"}
    assert any(name.startswith("encoders/0/") for name in manifest["files"])
    images = tiny_model_parts["support_images"]
    before = load_bundle(tmp_path / "bundle", device="cpu").ensemble().score(images)

    shutil.rmtree(registry)  # a later base training, or another machine: the registry is not there
    monkeypatch.chdir(tmp_path.parent)
    after = load_bundle(tmp_path / "bundle", device="cpu").ensemble().score(images)
    np.testing.assert_allclose(after["pred_score"], before["pred_score"], rtol=1e-5, atol=1e-6)

    encoder_file = next(p for p in (tmp_path / "bundle" / "encoders" / "0").rglob("*") if p.is_file())
    os.chmod(encoder_file, 0o644)
    encoder_file.write_bytes(encoder_file.read_bytes() + b"x")
    with pytest.raises(BundleError, match="changed since export"):
        load_bundle(tmp_path / "bundle", device="cpu")


def test_a_manifest_that_names_a_path_outside_the_bundle_is_refused(bundle_dir):
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    manifest["components"]["fusion"] = "../elsewhere/fusion.json"
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_bundle(bundle_dir)
