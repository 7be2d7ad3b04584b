"""Which categories a fleet covers and each one's data parameters (no Kedro involved)."""

import numpy as np
import pytest

from fsad_pipeline.data.fleet import fleet_plan
from fsad_pipeline.data.layouts import LayoutError, list_categories, materialise_textile

DATA = {"source": "mvtec", "root": "unused", "category": "widget", "max_pixels": 10, "textile": {"n_train_good": 3}}


def test_auto_lists_every_category_folder_of_the_source(tmp_path, datasets):
    datasets.mvtec_category(tmp_path, "widget")
    datasets.mvtec_category(tmp_path, "gadget")
    (tmp_path / "notes").mkdir()        # not a category: no train/good
    (tmp_path / ".cache" / "train" / "good").mkdir(parents=True)  # hidden
    assert list_categories("mvtec", tmp_path) == ["gadget", "widget"]
    plan = fleet_plan({"data": {**DATA, "root": str(tmp_path)}, "fleet": {"categories": "auto"}})
    assert list(plan) == ["gadget", "widget"]
    assert plan["gadget"] == {**DATA, "root": str(tmp_path), "category": "gadget"}  # all else shared


def test_auto_on_a_missing_root_says_so(tmp_path):
    with pytest.raises(LayoutError, match="does not exist"):
        fleet_plan({"data": {**DATA, "root": str(tmp_path / "nowhere")}, "fleet": {"categories": "auto"}})
    with pytest.raises(LayoutError, match="no folder-layout category"):
        list_categories("folder", tmp_path)


def test_textile_auto_gives_disjoint_pseudo_categories():
    data = {**DATA, "source": "textile", "category": "textile"}
    plan = fleet_plan({"data": data, "fleet": {"categories": "auto", "textile_parts": 3}})
    assert list(plan) == ["textile_0", "textile_1", "textile_2"]
    assert [p["textile"]["part"] for p in plan.values()] == [0, 1, 2]
    assert plan["textile_2"]["textile"]["n_train_good"] == 3
    assert "part" not in data["textile"]  # the global block is never modified


def test_explicit_list_and_per_category_overrides():
    plan = fleet_plan({"data": DATA, "fleet": {"categories": ["b", "a"],
                                               "data_overrides": {"a": {"root": "/mnt/a", "textile": {"part": 9}}}}})
    assert list(plan) == ["b", "a"]
    assert plan["a"]["root"] == "/mnt/a" and plan["a"]["textile"] == {"n_train_good": 3, "part": 9}
    assert plan["b"]["root"] == "unused"
    assert list(fleet_plan({"data": DATA, "fleet": {"categories": "b+a"}})) == ["b", "a"]  # from --params


@pytest.mark.parametrize(
    ("fleet", "message"),
    [
        ({"categories": []}, "empty"),
        ({"categories": ["a", "a"]}, "more than once"),
        ({"categories": ["a.b"]}, "namespaces"),
        ({"categories": ["a"], "data_overrides": {"z": {}}}, "outside the fleet"),
    ],
)
def test_bad_fleet_parameters_fail_clearly(fleet, message):
    with pytest.raises(ValueError, match=message):
        fleet_plan({"data": DATA, "fleet": fleet})


def _names(root, sub):
    return sorted(p.name for p in (root / sub).iterdir())


def test_textile_parts_are_disjoint_blocks(tmp_path, datasets):
    source = tmp_path / "simulated"
    for name, count in (("nominal", 10), ("global", 4), ("local", 4)):
        for i in range(count):
            datasets.write_image(source / name / f"{name}_{i:03d}.png", np.full((8, 8, 3), i, np.uint8))
    sizes = {"n_train_good": 2, "n_test_good": 2, "n_test_per_defect": 2}
    first = materialise_textile(tmp_path / "raw", "t_0", source_dir=source, **sizes)
    second = materialise_textile(tmp_path / "raw", "t_1", part=1, source_dir=source, **sizes)
    assert _names(first, "train/good") == ["nominal_000.png", "nominal_001.png"]
    assert _names(second, "train/good") == ["nominal_004.png", "nominal_005.png"]
    assert _names(second, "test/good") == ["nominal_006.png", "nominal_007.png"]
    assert _names(second, "test/local") == ["local_002.png", "local_003.png"]
    with pytest.raises(ValueError, match="part 2"):
        materialise_textile(tmp_path / "raw", "t_2", part=2, source_dir=source, **sizes)
