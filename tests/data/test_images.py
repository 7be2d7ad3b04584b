from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsad_pipeline.data.images import BadImageError, read_image, read_image_with_note, read_mask, resize_image


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_rgb_roundtrip(tmp_path):
    array = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    image, note = read_image_with_note(_save(tmp_path / "a.png", array))
    assert image.dtype == np.uint8 and image.shape == (20, 30, 3)
    assert np.array_equal(image, array) and note == ""


def test_grayscale_becomes_rgb(tmp_path):
    gray = np.arange(200, dtype=np.uint8).reshape(10, 20)
    image, note = read_image_with_note(_save(tmp_path / "g.png", gray))
    assert image.shape == (10, 20, 3)
    assert np.array_equal(image[..., 0], gray) and np.array_equal(image[..., 2], gray)
    assert note == "converted from L"


def test_rgba_drops_alpha(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    image = read_image(_save(tmp_path / "a.png", rgba))
    assert image.shape == (8, 8, 3) and int(image[0, 0, 0]) == 200


def test_16bit_is_scaled_to_8bit(tmp_path):
    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    image, note = read_image_with_note(path)
    assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
    assert image.max() == round(63000 / 257) and "converted" in note


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(BadImageError, match="empty.png: zero-byte"):
        read_image(path)


def test_truncated_file(tmp_path):
    array = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = _save(tmp_path / "t.png", array)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="t.png: cannot decode"):
        read_image(path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "c.jpg"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(BadImageError, match="c.jpg"):
        read_image(path)


def test_decompression_bomb_guard(tmp_path):
    path = _save(tmp_path / "big.png", np.zeros((100, 100), np.uint8))
    with pytest.raises(BadImageError, match="decompression-bomb"):
        read_image(path, max_pixels=5_000)
    assert read_image(path, max_pixels=10_000).shape == (100, 100, 3)


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="does not exist"):
        read_image(tmp_path / "nope.png")


def test_mask_binarised_and_size_checked(tmp_path):
    mask = np.zeros((10, 12), np.uint8)
    mask[2:4, 3:5] = 255
    mask[0, 0] = 85  # a stray grey value still counts as defect (threshold 0)
    path = _save(tmp_path / "m.png", mask)
    read = read_mask(path, expected_size=(12, 10))
    assert read.dtype == np.uint8 and set(np.unique(read)) == {0, 1} and read.sum() == 5
    assert read_mask(path, threshold=127).sum() == 4
    with pytest.raises(BadImageError, match="mask is 12x10 but its image is 20x10"):
        read_mask(path, expected_size=(20, 10))


def test_resize_image():
    image = np.zeros((10, 20, 3), np.uint8)
    assert resize_image(image, 8).shape == (8, 8, 3)
    assert resize_image(image, (5, 7)).shape == (5, 7, 3)


def _png16(path, array, significant_bits=None):
    """Write a 16-bit grayscale PNG, optionally with an sBIT chunk declaring its significant bits."""
    import struct
    import zlib

    Image.fromarray(array.astype(np.uint16)).save(path)
    if significant_bits is not None:
        data = path.read_bytes()
        chunk = struct.pack(">I", 1) + b"sBIT" + bytes([significant_bits])
        chunk += struct.pack(">I", zlib.crc32(b"sBIT" + bytes([significant_bits])) & 0xFFFFFFFF)
        end_of_ihdr = 8 + 8 + 13 + 4
        path.write_bytes(data[:end_of_ihdr] + chunk + data[end_of_ihdr:])
    return path


def test_16_bit_images_are_scaled_by_their_declared_depth_not_their_content(tmp_path):
    """Issue 18, defect 3: the scale came from the image's own maximum, so two nearly equal
    images (max 255 vs 256) came out with mean 145 vs 0.7."""
    ramp = np.tile(np.arange(0, 256, dtype=np.uint16), (4, 1))
    low = read_image(_png16(tmp_path / "a.png", ramp))
    high = read_image(_png16(tmp_path / "b.png", np.minimum(ramp + 1, 256)))
    assert abs(float(low.mean()) - float(high.mean())) < 0.05  # one grey level of 65535 apart
    assert int(low.max()) == round(255 * 255 / 65535)
    full = read_image(_png16(tmp_path / "c.png", np.full((4, 4), 65535)))
    assert int(full.min()) == 255


def test_a_12_bit_png_stored_as_the_specification_says_keeps_its_full_range(tmp_path):
    """sBIT = 12: the PNG specification stores the samples scaled to 16 bits (left bit
    replication), so white is 65535 and must stay white; sBIT does not rescale."""
    twelve = np.array([[0, 2048, 4095]] * 3, dtype=np.uint32)
    stored = (twelve << 4) | (twelve >> 8)  # the specification's left bit replication
    image = read_image(_png16(tmp_path / "cam.png", stored, significant_bits=12))
    assert image[0, :, 0].tolist() == [0, 128, 255]


def test_a_16_bit_mask_of_zeros_and_ones_keeps_its_defect(tmp_path):
    from fsad_pipeline.data.images import read_mask

    mask = np.zeros((8, 8), np.uint16)
    mask[2:4, 2:4] = 1
    assert read_mask(_png16(tmp_path / "m.png", mask)).sum() == 4


def test_data_max_pixels_is_the_guard_that_applies_above_pils_own_limit(tmp_path, monkeypatch):
    """Issue 18, defect 4: PIL's own limit refused images below data.max_pixels, with PIL's message."""
    path = _save(tmp_path / "big.png", np.zeros((40, 50, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL errors above 2 x 500 = 1000 pixels
    assert read_image(path, max_pixels=10_000).shape == (40, 50, 3)
    assert Image.MAX_IMAGE_PIXELS == 500  # restored
    with pytest.raises(BadImageError, match="exceeds the decompression-bomb guard of 1000 pixels"):
        read_image(path, max_pixels=1000)


@pytest.mark.parametrize("offset", range(4))
@pytest.mark.parametrize("width", [1, 2, 3])
def test_shrinking_a_mask_keeps_a_thin_scratch_wherever_it_falls(offset, width):
    """1024 -> 256 by nearest neighbour sampled every 4th row: a 1-3 px line vanished at most offsets."""
    from fsad_pipeline.data.images import resize_mask

    mask = np.zeros((64, 64), np.uint8)
    mask[20 + offset : 20 + offset + width, 8:56] = 1
    small = resize_mask(mask, (16, 16))
    assert small.dtype == np.uint8 and set(np.unique(small)) == {0, 1}
    assert small[5:8, 2:14].any(axis=0).all()  # the whole line is still there
    assert small.sum() <= 2 * 12  # and it has not grown beyond the cells it touches
    assert resize_mask(mask, (128, 128)).sum() == 4 * mask.sum()  # enlarging: nearest, exact


def test_one_bit_and_float_masks_read_by_their_values_not_their_range(tmp_path):
    from fsad_pipeline.data.images import read_mask

    Image.fromarray(np.ones((6, 6), bool)).convert("1").save(tmp_path / "all.png")
    assert read_mask(tmp_path / "all.png").sum() == 36  # an all-defect 1-bit mask is all defect
    Image.fromarray(np.full((6, 6), 1.0, np.float32), mode="F").save(tmp_path / "all.tiff")
    assert read_mask(tmp_path / "all.tiff").sum() == 36
    half = np.zeros((6, 6), np.float32)
    half[:3] = 0.4
    Image.fromarray(half, mode="F").save(tmp_path / "half.tiff")
    assert read_mask(tmp_path / "half.tiff", threshold=127).sum() == 0  # 0.4 * 255 = 102 <= 127
    assert read_mask(tmp_path / "half.tiff", threshold=50).sum() == 18


def test_an_exif_rotated_jpeg_is_read_and_sized_as_it_is_displayed(tmp_path):
    from fsad_pipeline.data.geometry import read_image_sizes

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "cam.jpg", exif=exif, quality=95)
    image = read_image(tmp_path / "cam.jpg")
    assert image.shape == (40, 20, 3) and read_image_sizes([tmp_path / "cam.jpg"]) == [(40, 20)]
    assert image[:10].mean() > 200 and image[-10:].mean() < 50  # the band is now at the top
