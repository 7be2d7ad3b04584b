"""The real KolektorSDD factory drop (``../shared/data/kolektorsdd``) read through the ``folder``
layout, exactly as ``kedro run --pipelines=dfd --params data.source=folder,...`` reads it.

Non-commercial data that is never copied into the project: these tests skip when it is absent
(a fresh clone elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fsad_pipeline.data.images import read_image, read_mask
from fsad_pipeline.data.layouts import discover_folder
from fsad_pipeline.data.sampling import select_support

KOLEKTOR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kolektorsdd"

pytestmark = pytest.mark.skipif(not (KOLEKTOR / "kolektor").is_dir(), reason="../shared/data/kolektorsdd is absent")


def test_the_drop_is_found_with_every_mask():
    records = discover_folder(KOLEKTOR, "kolektor")
    goods = [r for r in records if r.label == 0]
    defects = [r for r in records if r.label == 1]
    assert len(goods) == 333 and len(defects) == 50  # the dataset README's counts
    assert {r.defect_type for r in defects} == {"crack"}
    assert all(r.mask_path and r.masks_expected for r in defects)
    assert {r.split for r in goods} == {"train", "test"} and all(r.split == "test" for r in defects)
    # The good images are split once, deterministically: no image is both support pool and test.
    assert len({r.path for r in records}) == len(records)
    assert [r.split for r in discover_folder(KOLEKTOR, "kolektor")] == [r.split for r in records]


def test_masks_match_their_images_and_mark_the_crack():
    defects = [r for r in discover_folder(KOLEKTOR, "kolektor") if r.label == 1][:5]
    for record in defects:
        image = read_image(record.path)
        mask = read_mask(record.mask_path, expected_size=(image.shape[1], image.shape[0]))
        assert image.ndim == 3 and image.shape[2] == 3  # grayscale files come back as RGB
        assert 0 < mask.mean() < 0.2  # a thin crack: present, far from the whole image


def test_the_support_set_comes_from_the_training_share_only():
    manifest = pd.DataFrame([r.to_dict() for r in discover_folder(KOLEKTOR, "kolektor")])
    test = set(manifest.loc[manifest["split"] == "test", "path"])
    for k in (2, 8):
        (support,) = select_support(manifest, k_shot=k, seed=0)["rounds"]
        assert len(support) == k and not set(support) & test
