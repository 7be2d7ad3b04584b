"""Tests for the base-category discovery and the leave-one-category-out split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fsad_pipeline.data.base_data import discover_base_categories, leave_one_out_split
from fsad_pipeline.data.layouts import LayoutError


@pytest.fixture
def base_roots(tmp_path, datasets):
    mvtec = tmp_path / "base"
    for seed, name in enumerate(("alpha", "beta", "gamma")):
        datasets.mvtec_category(mvtec, name, n_train=9, n_test_good=2, defects={"spot": 2}, size=16, seed=seed)
    drops = tmp_path / "drops"
    datasets.folder_drop(drops, "delta", n_good=8, defects={"crack": 2}, size=16)
    return [{"source": "mvtec", "root": str(mvtec)}, {"source": "folder", "root": str(drops)}]


def _all_paths(split: dict) -> list[str]:
    return [p for parts in split["categories"].values() for paths in parts.values() for p in paths]


def test_leave_one_out_never_puts_a_target_image_in_training(base_roots):
    for target in ("alpha", "beta", "gamma", "delta"):
        split = leave_one_out_split(base_roots, target=target, images_per_category=None, validation_per_category=2, seed=0)
        assert target not in split["categories"]
        assert len(split["categories"]) == 3
        for path in _all_paths(split):
            assert f"/{target}/" not in path
            assert "/test/" not in path and "/defect/" not in path  # good training images only


def test_target_folder_is_left_out_even_under_another_name(base_roots, tmp_path):
    target_dir = Path(base_roots[0]["root"]) / "beta"
    split = leave_one_out_split(base_roots, target="my_part", target_dir=target_dir, validation_per_category=2, seed=0)
    assert set(split["categories"]) == {"alpha", "gamma", "delta"}


def test_split_is_disjoint_capped_and_deterministic(base_roots):
    split = leave_one_out_split(base_roots, target="alpha", images_per_category=4, validation_per_category=2, seed=3)
    for name, parts in split["categories"].items():
        pool = 4 if name == "delta" else 9  # the drop's 8 goods are split half/half first
        assert len(parts["validation"]) == min(2, pool // 3), name  # at most a third is held back
        assert len(parts["train"]) == min(4, pool - len(parts["validation"])), name
        assert not set(parts["train"]) & set(parts["validation"])
    again = leave_one_out_split(base_roots, target="alpha", images_per_category=4, validation_per_category=2, seed=3)
    assert again == split
    other = leave_one_out_split(base_roots, target="alpha", images_per_category=4, validation_per_category=2, seed=4)
    assert other != split


def test_a_category_without_test_split_still_serves_as_base(tmp_path, datasets):
    root = tmp_path / "base"
    for i in range(3):
        datasets.write_image(root / "solo" / "train" / "good" / f"{i}.png", np.full((8, 8, 3), i * 40 + 10, np.uint8))
    categories = discover_base_categories([{"source": "mvtec", "root": str(root)}])
    assert list(categories) == ["solo"] and len(categories["solo"]) == 3


def test_no_base_category_left_is_an_error(base_roots):
    with pytest.raises(LayoutError, match="no base category"):
        discover_base_categories(base_roots[:1], exclude=["alpha", "beta", "gamma"])
