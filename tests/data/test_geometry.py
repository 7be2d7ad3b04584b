"""Working size, aspect-preserving fit and tiling (fsad_pipeline.data.geometry)."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fsad_pipeline.data.geometry import (
    ResizedMaps,
    as_hw,
    capped_size,
    check_size_multiple,
    fit_to_size,
    image_size_matches,
    read_image_sizes,
    resolve_working_size,
    stitch_maps,
    tile_image,
    working_size_record,
)
from fsad_pipeline.data.images import resize_image
from fsad_pipeline.data.sampling import load_native_gt_masks
from fsad_pipeline.evaluation.metrics import pixel_auroc
from fsad_pipeline.evaluation.report import evaluate_predictions


def test_as_hw_reads_ints_pairs_and_the_working_size_record():
    assert as_hw(64) == (64, 64)
    assert as_hw(np.int64(32)) == (32, 32)
    assert as_hw([64, 96]) == (64, 96) and as_hw((64, 96)) == (64, 96)
    assert as_hw({"image_size": [640, 256], "layout": "keep_aspect"}) == (640, 256)
    with pytest.raises(ValueError, match="height, width"):
        as_hw([1, 2, 3])


def test_size_multiple_error_names_the_size_and_a_fix():
    assert check_size_multiple((64, 96), 16) == (64, 96)
    with pytest.raises(ValueError, match=r"100x96 .*multiple of 16.*96x96"):
        check_size_multiple((100, 96), 16)


def test_square_pools_resolve_to_the_square_in_both_layouts():
    sizes = [(900, 900), (1024, 1024)]
    assert resolve_working_size(sizes, 256, layout="keep_aspect") == (256, 256)
    assert resolve_working_size(sizes, 256, layout="squeeze") == (256, 256)


def test_keep_aspect_takes_the_median_aspect_and_the_pools_orientation():
    portrait = [(630, 250), (627, 250), (633, 250)]  # KolektorSDD-like: 2.52 high per wide
    assert resolve_working_size(portrait, 256, multiple=16) == (640, 256)
    assert resolve_working_size(portrait, 256, layout="squeeze") == (256, 256)
    landscape = [(h, w) for w, h in portrait]
    assert resolve_working_size(landscape, 256, multiple=32) == (256, 640)
    assert resolve_working_size(portrait, [128, 64]) == (128, 64)  # an explicit [H, W] wins
    with pytest.raises(ValueError, match="image_layout"):
        resolve_working_size(portrait, 256, layout="stretch")


def test_max_upscale_keeps_small_images_at_their_native_size():
    """juice_bottle-like pool (256 x 128, H x W): the short side stays 128 at max_upscale 1.0 instead
    of being doubled to 256; large pools and explicit [H, W] sizes are unaffected."""
    small = [(256, 128)] * 5
    assert resolve_working_size(small, 256, max_upscale=None) == (512, 256)
    assert resolve_working_size(small, 256, max_upscale=1.0) == (256, 128)
    assert resolve_working_size(small, 256, max_upscale=1.5) == (384, 192)
    large = [(631, 250)] * 5  # KolektorSDD-like: 250 rounds to 256, nothing is capped
    assert resolve_working_size(large, 256, max_upscale=1.0) == resolve_working_size(large, 256) == (640, 256)
    assert resolve_working_size(small, [512, 256], max_upscale=1.0) == (512, 256)
    assert resolve_working_size(small, 256, layout="squeeze", max_upscale=1.0) == (256, 256)
    with pytest.raises(ValueError, match="image_max_upscale"):
        resolve_working_size(small, 256, max_upscale=0)


def test_working_size_record_reads_headers(tmp_path):
    paths = []
    for index, (width, height) in enumerate([(50, 126), (50, 124), (52, 130)]):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (width, height)).save(path)
        paths.append(str(path))
    assert read_image_sizes(paths[:1]) == [(126, 50)]
    record = working_size_record(paths, 64, layout="keep_aspect", multiple=16)
    assert record["image_size"] == [160, 64] and record["pool_images"] == 3
    assert record["median_aspect"] == pytest.approx(2.5, abs=0.03)
    assert working_size_record(paths, 64, layout="squeeze")["image_size"] == [64, 64]


def test_image_size_expectation_int_is_the_short_side():
    assert image_size_matches([640, 256], 256) and image_size_matches(256, 256)
    assert not image_size_matches([640, 256], 640)
    assert image_size_matches([640, 256], [640, 256]) and not image_size_matches([640, 256], [256, 640])


def test_fit_to_size_crops_another_aspect_and_resizes_the_same_one():
    rng = np.random.default_rng(0)
    same = rng.integers(0, 255, (128, 64, 3), dtype=np.uint8)
    assert np.array_equal(fit_to_size(same, (64, 32)), resize_image(same, (64, 32)))
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, 32:96] = 255  # the centre half is white
    fitted = fit_to_size(wide, (32, 32))
    assert fitted.shape == (32, 32, 3) and fitted.min() == 255  # the margins were cropped, not squeezed


@pytest.mark.parametrize("shape", [(100, 37), (64, 64), (20, 200), (10, 10)])
def test_tiles_cover_every_pixel_and_stitching_round_trips(shape):
    rng = np.random.default_rng(1)
    image = rng.random(shape).astype(np.float32)
    tiles, boxes = tile_image(image, (32, 32), overlap=0.25)
    assert tiles.shape[1:] == (32, 32) and len(tiles) == len(boxes)
    covered = np.zeros((max(shape[0], 32), max(shape[1], 32)), int)
    for top, left, bottom, right in boxes:
        covered[top:bottom, left:right] += 1
    assert (covered[: shape[0], : shape[1]] >= 1).all()
    # Tiles of the identity "model" stitch back to the image exactly (average of equal values).
    assert np.allclose(stitch_maps(tiles, boxes, shape), image)
    constant = stitch_maps(np.full((len(boxes), 32, 32), 0.7, np.float32), boxes, shape)
    assert constant.shape == shape and np.allclose(constant, 0.7)


def test_neighbouring_tiles_share_the_overlap():
    _, boxes = tile_image(np.zeros((64, 160)), (64, 64), overlap=0.5)
    lefts = [left for _, left, _, _ in boxes]
    assert lefts[0] == 0 and lefts[-1] == 160 - 64
    assert all(64 - (b - a) >= 32 for a, b in zip(lefts, lefts[1:]))


def test_stitch_refuses_uncovered_pixels_and_mismatched_maps():
    with pytest.raises(ValueError, match="uncovered"):
        stitch_maps(np.zeros((1, 4, 4)), [(0, 0, 4, 4)], (8, 8))
    with pytest.raises(ValueError, match="box"):
        stitch_maps(np.zeros((1, 4, 5)), [(0, 0, 4, 4)], (4, 4))


def test_capped_size_keeps_the_aspect():
    assert capped_size(630, 250, 1024) == (630, 250)
    assert capped_size(2048, 1024, 1024) == (1024, 512)
    assert capped_size(2048, 1024, None) == (2048, 1024)


def test_resized_maps_upsample_each_map_to_its_own_size_bilinearly():
    maps = np.stack([np.full((8, 4), 0.5, np.float16), np.arange(32, dtype=np.float16).reshape(8, 4)])
    native = ResizedMaps(maps, [(16, 8), (8, 4)])
    assert len(native) == 2 and native[0].shape == (16, 8) and np.allclose(native[0], 0.5)
    assert native[1].dtype == np.float32 and np.array_equal(native[1], maps[1].astype(np.float32))
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(maps[1:].astype(np.float32))[:, None], size=(16, 8), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(ResizedMaps(maps[1:], [(16, 8)])[0], expected, atol=1e-5)


def test_native_masks_and_ragged_maps_feed_the_pixel_metrics(tmp_path):
    paths, mask_paths, labels, maps = [], [], [], []
    for index, (height, width, label) in enumerate([(40, 20, 0), (60, 24, 1), (44, 20, 1)]):
        image = tmp_path / f"{index}.png"
        Image.new("RGB", (width, height)).save(image)
        mask = np.zeros((height, width), np.uint8)
        if label:
            mask[height // 4 : height // 2, width // 4 : width // 2] = 255
            Image.fromarray(mask).save(tmp_path / f"{index}_mask.png")
        paths.append(str(image))
        mask_paths.append(str(tmp_path / f"{index}_mask.png") if label else "")
        labels.append(label)
        maps.append(mask[::4, ::4].astype(np.float32) / 255)  # a perfect map, at a quarter size
    masks, has_mask = load_native_gt_masks(paths, mask_paths, labels)
    assert [m.shape for m in masks] == [(40, 20), (60, 24), (44, 20)] and has_mask.all()
    assert masks[1].max() == 1 and masks[0].max() == 0
    capped, _ = load_native_gt_masks(paths, mask_paths, labels, max_side=30)
    assert capped[1].shape == (30, 12)
    working = np.stack([cv2.resize(m, (5, 10)) for m in maps])  # one working size for all
    predictions = pd.DataFrame({"gt_label": labels, "pred_score": [0.0, 1.0, 1.0], "pred_label": [0, 1, 1],
                                "defect_type": ["good", "x", "x"]})
    metrics = evaluate_predictions(predictions, ResizedMaps(working, [m.shape for m in masks]), masks, has_mask)
    assert metrics["pixel_auroc"] > 0.9 and metrics["n_images_with_masks"] == 3
    by_hand = [cv2.resize(w, (m.shape[1], m.shape[0]), interpolation=cv2.INTER_LINEAR) for w, m in zip(working, masks)]
    assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc(masks, by_hand))
