import pytest

from fsad_pipeline.data.layouts import discover_mvtec
from fsad_pipeline.data.manifest import build_manifest
from fsad_pipeline.data.sampling import evaluation_set, load_images, select_support


@pytest.fixture
def manifest(mvtec_root):
    return build_manifest(discover_mvtec(mvtec_root, "widget"), progress=False)[0]


def test_support_selection_is_seeded(manifest):
    a = select_support(manifest, k_shot=2, seed=0, rounds=3)
    b = select_support(manifest, k_shot=2, seed=0, rounds=5)
    assert a["rounds"] == b["rounds"][:3]  # more rounds never change earlier ones
    assert all(len(r) == 2 and len(set(r)) == 2 for r in a["rounds"])
    assert select_support(manifest, k_shot=2, seed=1)["rounds"][0] != a["rounds"][0] or \
        select_support(manifest, k_shot=2, seed=2)["rounds"][0] != a["rounds"][0]
    train_paths = set(manifest.loc[manifest["split"] == "train", "path"])
    assert set(sum(a["rounds"], [])) <= train_paths
    assert a["pool_size"] == 6


def test_k_larger_than_pool(manifest):
    with pytest.raises(ValueError, match="k_shot=7 but only 6 good training image"):
        select_support(manifest, k_shot=7, seed=0)


def test_support_never_in_evaluation(manifest):
    support = select_support(manifest, k_shot=3, seed=0)["rounds"][0]
    evaluation = evaluation_set(manifest)
    assert not set(support) & set(evaluation["path"])
    assert len(evaluation_set(manifest, exclude=evaluation["path"][:2])) == len(evaluation) - 2


def test_load_images(manifest):
    images = load_images(manifest["path"][:3].tolist(), 32)
    assert images.shape == (3, 32, 32, 3) and images.dtype.name == "uint8"


def test_fewer_defect_images_than_k_defect_shots_is_said_not_shrunk_silently(manifest, caplog):
    """Issue 18, defect 10: a type with fewer images than asked for gave fewer shots without a word."""
    import logging

    from fsad_pipeline.data.sampling import select_defect_shots

    counts = manifest[manifest["label"] == 1].groupby("defect_type").size()
    with caplog.at_level(logging.WARNING, logger="fsad_pipeline.data.sampling"):
        shots = select_defect_shots(manifest, k_defect_shots=int(counts.max()) + 5, seed=0)["shots"]
    for defect_type, count in counts.items():
        assert len(shots[defect_type]) == count - 1  # one kept for evaluation
        assert any(repr(defect_type) in r.getMessage() and "instead of k_defect_shots" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fsad_pipeline.data.sampling"):
        select_defect_shots(manifest, k_defect_shots=1, seed=0)
    assert not caplog.records


def test_defect_shot_masks_honour_the_mask_threshold(tmp_path):
    """data.mask_threshold reaches the masks that are used: a JPEG-grey halo (value 40) around a
    defect (255) is defect at threshold 0 and normal at 128."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from fsad_pipeline.data.sampling import load_defect_shots

    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 40
    mask[6:10, 6:10] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "d.png")
    manifest = pd.DataFrame({"path": [str(tmp_path / "d.png")], "mask_path": [str(tmp_path / "m.png")], "label": [1]})
    shots = {"shots": {"scratch": [str(tmp_path / "d.png")]}}
    _, loose, _ = load_defect_shots(manifest, shots, (16, 16))
    _, strict, has_mask = load_defect_shots(manifest, shots, (16, 16), mask_threshold=128)
    assert loose.sum() == 64 and strict.sum() == 16 and has_mask.all()
