"""Issue 18: the bundle's content hash and files table are checked, folders respect the umask,
and the promotion log names the version it made (the frozen validation set: test_issue18_retrain.py)."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest

from fsad_pipeline.artifacts import atomic_directory
from fsad_pipeline.model_store.bundle import MANIFEST_FILE, BundleError, export_bundle, load_bundle, verify_bundle
from fsad_pipeline.model_store.store import ModelStore


def _export(parts, target):
    export_bundle(
        target, dfd_model=parts["dfd_model"], patch_scorers=parts["patch_scorers"], fusion=parts["fusion"],
        support_images=parts["support_images"], config_version=1, metrics={"image_auroc": 0.75},
        data_fingerprint="abc123",
    )
    return target


@pytest.fixture
def bundle_dir(tmp_path, tiny_model_parts):
    return _export(tiny_model_parts, tmp_path / "bundle")


def _manifest(bundle_dir) -> dict:
    return json.loads((bundle_dir / MANIFEST_FILE).read_text())


def _write_manifest(bundle_dir, manifest: dict) -> None:
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))


# ------------------------------------------------------------------ defect 9: content hash and files table
def test_an_edited_content_hash_is_refused(bundle_dir):
    manifest = _manifest(bundle_dir)
    _write_manifest(bundle_dir, {**manifest, "content_hash": "0" * 64})
    with pytest.raises(BundleError, match="content_hash"):
        load_bundle(bundle_dir, device="cpu")
    with pytest.raises(BundleError, match="content_hash"):
        verify_bundle(bundle_dir, check_files=False)


def test_a_tampered_file_whose_table_entry_was_rewritten_is_refused(bundle_dir):
    """Someone swaps fusion.json and fixes its row in the files table but not the content hash."""
    fusion = bundle_dir / "fusion.json"
    fusion.write_text(fusion.read_text().replace("0", "1", 1))
    manifest = _manifest(bundle_dir)
    import hashlib

    manifest["files"]["fusion.json"] = {"bytes": fusion.stat().st_size,
                                        "sha256": hashlib.sha256(fusion.read_bytes()).hexdigest()}
    _write_manifest(bundle_dir, manifest)
    with pytest.raises(BundleError, match="content_hash"):
        load_bundle(bundle_dir, device="cpu")


def test_a_listed_file_deleted_from_the_table_is_refused(bundle_dir):
    """A model file present on disk but dropped from the files table (content hash made to agree)
    must not be used unchecked."""
    from fsad_pipeline.model_store.bundle import _content_hash

    manifest = _manifest(bundle_dir)
    weights = next(name for name in manifest["files"] if name.startswith("dfd/") and name.endswith("dfd.safetensors"))
    del manifest["files"][weights]
    manifest["content_hash"] = _content_hash(manifest["files"])
    _write_manifest(bundle_dir, manifest)
    with pytest.raises(BundleError, match=re.escape(weights)):
        load_bundle(bundle_dir, device="cpu")


def test_an_unlisted_model_file_is_refused(bundle_dir):
    (bundle_dir / "patch_scorers" / "extra.safetensors").write_bytes(b"not in the table")
    with pytest.raises(BundleError, match=r"patch_scorers/extra\.safetensors"):
        load_bundle(bundle_dir, device="cpu")


def test_a_tampered_or_deleted_listed_file_is_refused_by_name(bundle_dir):
    support = bundle_dir / "support_images.npy"
    data = bytearray(support.read_bytes())
    data[-1] ^= 0xFF
    support.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"support_images\.npy has changed"):
        load_bundle(bundle_dir, device="cpu")
    support.unlink()
    with pytest.raises(BundleError, match=r"support_images"):
        load_bundle(bundle_dir, device="cpu")


def test_the_stores_promotion_record_is_not_an_unlisted_file(tmp_path, bundle_dir):
    entry = ModelStore(tmp_path / "models").promote(bundle_dir, {"kind": "test"})
    assert load_bundle(entry.path, device="cpu").promotion["version"] == "v0001"


# ------------------------------------------------------------------ defect 8: folder modes follow the umask
@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750), (0o077, 0o700)])
def test_atomic_directories_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "artifact") as staging:
            (staging / "file.txt").write_text("x")
        plain = tmp_path / "plain"
        plain.mkdir()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "artifact").stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)


# ------------------------------------------------------------------ defect 10: the promotion log names its version
def test_a_promotion_logs_the_version_it_made(tmp_path, bundle_dir, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="fsad_pipeline.model_store.store"):
        ModelStore(tmp_path / "models").promote(bundle_dir, {"kind": "test"})
    assert any("promoted v0001 to champion" in r.getMessage() for r in caplog.records)
