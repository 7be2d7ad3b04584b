import struct
import time

import cv2
import numpy as np
import pytest

from fsad_pipeline.synthesis.textures import (
    AUGMENT_OPS,
    TextureBank,
    augment_texture,
    read_gimp_pattern,
)


def _write_pat(path, pixels: np.ndarray, name: bytes = b"test pattern") -> None:
    height, width = pixels.shape[:2]
    bpp = 1 if pixels.ndim == 2 else pixels.shape[2]
    header_size = 24 + len(name) + 1
    header = struct.pack(">5I4s", header_size, 1, width, height, bpp, b"GPAT") + name + b"\0"
    path.write_bytes(header + np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("bpp", [1, 2, 3, 4])
def test_read_gimp_pattern_all_bpp(tmp_path, bpp):
    rng = np.random.default_rng(bpp)
    pixels = rng.integers(0, 256, size=(5, 7, bpp), dtype=np.uint8)
    if bpp in (2, 4):
        pixels[..., -1] = 255  # opaque: colour must survive unchanged
        pixels[0, 0, -1] = 0  # one transparent pixel: composited over mid-grey
    path = tmp_path / f"p{bpp}.pat"
    _write_pat(path, pixels[..., 0] if bpp == 1 else pixels)
    image = read_gimp_pattern(path)
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    colour = pixels[..., :1] if bpp in (1, 2) else pixels[..., :3]
    np.testing.assert_array_equal(image[1:, 1:], np.broadcast_to(colour, (5, 7, 3))[1:, 1:])
    if bpp in (2, 4):
        np.testing.assert_array_equal(image[0, 0], [128, 128, 128])


def test_read_gimp_pattern_errors(tmp_path):
    bad_magic = tmp_path / "bad.pat"
    bad_magic.write_bytes(struct.pack(">5I4s", 25, 1, 2, 2, 3, b"NOPE") + b"\0" + bytes(12))
    with pytest.raises(ValueError, match="bad.pat"):
        read_gimp_pattern(bad_magic)
    truncated = tmp_path / "short.pat"
    truncated.write_bytes(struct.pack(">5I4s", 25, 1, 4, 4, 3, b"GPAT") + b"\0" + bytes(10))
    with pytest.raises(ValueError, match="short.pat"):
        read_gimp_pattern(truncated)


def test_bank_without_dtd(tmp_path):
    start = time.perf_counter()
    bank = TextureBank.from_sources(gimp_dirs=(str(tmp_path / "missing"),))
    assert time.perf_counter() - start < 1.0
    assert len(bank) >= 8 and len(set(bank.class_names)) == len(bank)
    rng = np.random.default_rng(0)
    for _ in range(12):
        texture, name = bank.sample(rng, (40, 56))
        assert name in bank.class_names
        assert texture.shape == (40, 56, 3) and texture.dtype == np.uint8
    for name in bank.class_names:
        assert bank.sample_class(name, rng, (32, 32)).shape == (32, 32, 3)


def test_bank_includes_gimp_patterns_and_tiles_them(tmp_path):
    pattern = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    _write_pat(tmp_path / "sub" / "tiny.pat", pattern)
    bank = TextureBank.from_sources(gimp_dirs=(str(tmp_path),), use_skimage=False, procedural=False)
    assert bank.class_names == ["gimp:tiny"]
    tiled = bank.sample_class("gimp:tiny", np.random.default_rng(0), (20, 30))
    assert tiled.shape == (20, 30, 3)
    np.testing.assert_array_equal(tiled[:8], tiled[8:16])  # periodic: tiled, not stretched


def _fake_dtd(root, classes=("banded", "dotted"), nested=False):
    base = root / "images" if nested else root
    for index, name in enumerate(classes):
        folder = base / name
        folder.mkdir(parents=True)
        for k in range(3):
            bgr = np.zeros((24, 24, 3), np.uint8)
            bgr[..., 2] = 255  # pure red in BGR order
            bgr[:, :, index] = 40 * k
            cv2.imwrite(str(folder / f"{name}_{k:04d}.jpg"), bgr)
    return root


@pytest.mark.parametrize("nested", [False, True])
def test_fake_dtd_gives_exactly_its_classes(tmp_path, nested):
    bank = TextureBank.from_sources(_fake_dtd(tmp_path, nested=nested))
    assert bank.class_names == ["banded", "dotted"]
    texture = bank.sample_class("dotted", np.random.default_rng(0), (16, 20))
    assert texture.shape == (16, 20, 3) and texture.dtype == np.uint8
    assert texture[..., 0].mean() > 200 and texture[..., 2].mean() < 60  # RGB, not BGR


def test_missing_or_empty_dtd_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextureBank.from_sources(tmp_path / "nowhere")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="no texture images"):
        TextureBank.from_sources(tmp_path)


def _test_texture() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8), (48, 48), interpolation=cv2.INTER_LINEAR)
    return np.clip(base.astype(int) // 2 + 60, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("op", AUGMENT_OPS, ids=lambda op: op.__name__)
def test_each_augmentation_op(op):
    texture = _test_texture()
    changed = False
    for seed in range(10):  # some ops draw a no-op now and then (solarize p=0.5, posterize 8 bits)
        out = op(texture.copy(), np.random.default_rng(seed))
        assert out.shape == texture.shape and out.dtype == np.uint8
        changed |= not np.array_equal(out, texture)
    assert changed


def test_augment_texture_deterministic_and_valid():
    texture = _test_texture()
    a = augment_texture(texture, np.random.default_rng(5))
    b = augment_texture(texture, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == texture.shape and a.dtype == np.uint8
    outputs = [augment_texture(texture, np.random.default_rng(s)) for s in range(6)]
    assert any(not np.array_equal(outputs[0], o) for o in outputs[1:])
    np.testing.assert_array_equal(augment_texture(texture, np.random.default_rng(0), n_ops=0), texture)
