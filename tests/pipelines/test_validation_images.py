import numpy as np
import pandas as pd
import pytest

from fsad_pipeline.pipelines.synthesis.nodes import load_validation_images


def _pool(tmp_path, datasets, n_good):
    paths = []
    for i in range(n_good):
        path = tmp_path / f"good_{i}.png"
        datasets.write_image(path, datasets.normals(np.random.default_rng(i), 1, 32)[0])
        paths.append(str(path))
    manifest = pd.DataFrame({"path": paths, "split": ["train"] * n_good, "label": [0] * n_good})
    return manifest, {"rounds": [paths[:2]]}


def _load(manifest, selection, base, minimum=4):
    synthesis = {"validation": {"base": base, "min_unseen_images": minimum}}
    return load_validation_images(manifest, selection, 32, {"max_pixels": 10**8}, synthesis,
                                  {"unseen_normals": 20}, {"calibration_images": 100}, 0)


def test_the_validation_base_follows_the_pool(tmp_path, datasets):
    manifest, selection = _pool(tmp_path, datasets, 2 + 15)  # 15 unseen: the fusion's third is 5
    images = _load(manifest, selection, "auto")
    assert images.shape == (5, 32, 32, 3)
    assert _load(manifest, selection, "supports").shape == (0, 32, 32, 3)
    assert _load(manifest, selection, "auto", minimum=6).shape == (0, 32, 32, 3)  # too few: the supports
    with pytest.raises(ValueError, match="min_unseen_images"):
        _load(manifest, selection, "unseen", minimum=6)
    with pytest.raises(ValueError, match="base must be one of"):
        _load(manifest, selection, "pool")
