from pathlib import Path

import pytest

from fsad_pipeline.data.layouts import LayoutError, discover, discover_folder, discover_mvtec, materialise_textile


def test_mvtec_layout(mvtec_root):
    records = discover_mvtec(mvtec_root, "widget")
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    assert len(train) == 6 and all(r.label == 0 and r.defect_type == "good" for r in train)
    assert len(test) == 4 + 3 + 3
    defects = [r for r in test if r.label == 1]
    assert {r.defect_type for r in defects} == {"scratch", "spot"}
    assert all(Path(r.mask_path).name == Path(r.path).stem + "_mask.png" for r in defects)


def test_folder_layout_splits_goods_deterministically(folder_root):
    a = discover_folder(folder_root, "part", train_good_fraction=0.5, split_seed=0)
    b = discover_folder(folder_root, "part", train_good_fraction=0.5, split_seed=0)
    assert a == b
    goods = [r for r in a if r.label == 0]
    assert sum(r.split == "train" for r in goods) == 4 and sum(r.split == "test" for r in goods) == 4
    defects = [r for r in a if r.label == 1]
    assert len(defects) == 3 and all(r.defect_type == "crack" and r.mask_path for r in defects)
    c = discover_folder(folder_root, "part", train_good_fraction=0.5, split_seed=1)
    assert [r.split for r in c] != [r.split for r in a]


def test_missing_category_names_what_exists(mvtec_root):
    with pytest.raises(LayoutError, match=r"nothere does not exist \(found: widget\)"):
        discover_mvtec(mvtec_root, "nothere")
    with pytest.raises(LayoutError, match="category is empty"):
        discover_mvtec(mvtec_root, "")


def test_empty_category(tmp_path):
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(LayoutError, match="holds no images"):
        discover_mvtec(tmp_path, "empty")
    (tmp_path / "drop" / "good").mkdir(parents=True)
    with pytest.raises(LayoutError, match="holds no images"):
        discover_folder(tmp_path, "drop")


def test_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="unknown data.source"):
        discover("hdf5", tmp_path, "x")


def test_textile_materialisation_is_fixed_and_idempotent(tmp_path):
    root = materialise_textile(tmp_path, "textile", n_train_good=3, n_test_good=2, n_test_per_defect=2)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    assert len(names) == 3 + 2 + 2 + 2
    assert names[-3:] == ["train/good/" + n.split("/")[-1] for n in names[-3:]]
    again = materialise_textile(tmp_path, "textile", n_train_good=3, n_test_good=2, n_test_per_defect=2)
    assert sorted(p.relative_to(again).as_posix() for p in again.rglob("*.jpg")) == names
    records = discover("textile", tmp_path, "textile", n_train_good=2, n_test_good=2, n_test_per_defect=1)
    assert sum(r.split == "train" for r in records) == 2  # a smaller split leaves no stale files
    assert {r.defect_type for r in records if r.label} == {"global", "local"}
