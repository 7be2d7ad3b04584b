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
