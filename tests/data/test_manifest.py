import numpy as np
import pytest

from fsad_pipeline.data.images import BadImageError
from fsad_pipeline.data.layouts import discover_folder, discover_mvtec
from fsad_pipeline.data.manifest import MANIFEST_COLUMNS, build_manifest, manifest_fingerprint


def test_manifest_columns_and_hashes(mvtec_root):
    manifest, rejects = build_manifest(discover_mvtec(mvtec_root, "widget"), progress=False)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 16 and rejects.empty
    assert (manifest["width"] == 64).all() and manifest["sha256"].str.len().eq(64).all()
    assert manifest_fingerprint(manifest) == manifest_fingerprint(manifest.iloc[::-1])


def test_bad_images_are_skipped_and_listed(mvtec_root):
    bad_zero = mvtec_root / "widget" / "test" / "good" / "zero.png"
    bad_zero.write_bytes(b"")
    truncated = mvtec_root / "widget" / "train" / "good" / "000.png"
    truncated.write_bytes(truncated.read_bytes()[:100])
    manifest, rejects = build_manifest(discover_mvtec(mvtec_root, "widget"), progress=False)
    assert set(rejects["path"]) == {str(bad_zero), str(truncated)}
    assert (rejects["kind"] == "image").all()
    assert str(bad_zero) not in set(manifest["path"]) and len(manifest) == 15


def test_fail_mode_names_the_file(mvtec_root):
    bad = mvtec_root / "widget" / "test" / "good" / "zero.png"
    bad.write_bytes(b"")
    with pytest.raises(BadImageError, match="zero.png: zero-byte"):
        build_manifest(discover_mvtec(mvtec_root, "widget"), on_bad_image="fail", progress=False)


def test_mask_problems_keep_the_image(mvtec_root, datasets):
    gt = mvtec_root / "widget" / "ground_truth" / "scratch"
    (gt / "000_mask.png").unlink()  # missing
    datasets.write_image(gt / "001_mask.png", np.zeros((32, 32), np.uint8))  # wrong size
    manifest, rejects = build_manifest(discover_mvtec(mvtec_root, "widget"), progress=False)
    assert len(manifest) == 16
    reasons = dict(zip(rejects["path"].map(lambda p: p.rsplit("/", 1)[-1]), rejects["reason"]))
    assert "mask missing" in reasons["000.png"]
    assert "mask is 32x32 but its image is 64x64" in reasons["001_mask.png"]
    rows = manifest.set_index(manifest["path"].str.rsplit("/", n=2).str[-2:].str.join("/"))
    assert rows.loc["scratch/000.png", "mask_path"] == "" and rows.loc["scratch/001.png", "mask_path"] == ""
    assert rows.loc["scratch/002.png", "mask_path"] != ""


def test_converted_images_are_noted(folder_root, datasets):
    datasets.write_image(folder_root / "part" / "good" / "gray.png", np.full((64, 64), 90, np.uint8))
    manifest, _ = build_manifest(discover_folder(folder_root, "part"), progress=False)
    assert manifest.loc[manifest["path"].str.endswith("gray.png"), "note"].item() == "converted from L"


def test_all_training_images_bad(tmp_path, datasets):
    root = tmp_path / "r"
    datasets.mvtec_category(root, "c", n_train=2)
    for p in (root / "c" / "train" / "good").iterdir():
        p.write_bytes(b"")
    with pytest.raises(ValueError, match="no usable good training image"):
        build_manifest(discover_mvtec(root, "c"), progress=False)
