"""Texture sources for pseudo-anomalies (DTD or offline stand-ins) and the DRAEM texture augmenter."""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .perlin import perlin_noise, rotate_about_center

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_GIMP_DIRS = ("/usr/share/gimp/2.0/patterns",)
SKIMAGE_TEXTURES = ("brick", "grass", "gravel")
GIMP_MAGIC = b"GPAT"
GIMP_HEADER = struct.Struct(">5I4s")  # header_size, version, width, height, bpp, magic
ALPHA_BACKGROUND = 128  # grey that transparent pattern pixels are composited over

KIND_FILES = "files"
KIND_GIMP = "gimp"
KIND_SKIMAGE = "skimage"
KIND_PROCEDURAL = "procedural"

Size = tuple[int, int]
TextureGenerator = Callable[[np.random.Generator, Size], np.ndarray]


# --------------------------------------------------------------------------------------------
# GIMP patterns
# --------------------------------------------------------------------------------------------
def read_gimp_pattern(path: str | Path) -> np.ndarray:
    """Decode a GIMP ``.pat`` file to uint8 H×W×3 RGB (alpha composited over mid-grey)."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < GIMP_HEADER.size:
        raise ValueError(f"{path}: truncated GIMP pattern header ({len(raw)} bytes)")
    header_size, _version, width, height, bpp, magic = GIMP_HEADER.unpack_from(raw)
    if magic != GIMP_MAGIC:
        raise ValueError(f"{path}: not a GIMP pattern (magic {magic!r}, expected {GIMP_MAGIC!r})")
    if bpp not in (1, 2, 3, 4):
        raise ValueError(f"{path}: unsupported bytes per pixel {bpp}")
    if header_size < GIMP_HEADER.size or width == 0 or height == 0:
        raise ValueError(f"{path}: invalid header (size {header_size}, {width}x{height})")
    n_bytes = width * height * bpp
    pixels = raw[header_size : header_size + n_bytes]
    if len(pixels) != n_bytes:
        raise ValueError(f"{path}: truncated pixel data ({len(pixels)} of {n_bytes} bytes)")
    data = np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, bpp)
    colour = data[..., :1] if bpp in (1, 2) else data[..., :3]
    if bpp in (2, 4):
        alpha = data[..., -1:].astype(np.float32) / 255.0
        colour = np.rint(colour * alpha + ALPHA_BACKGROUND * (1.0 - alpha)).astype(np.uint8)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    return np.ascontiguousarray(colour)


def read_rgb_image(path: str | Path) -> np.ndarray:
    """cv2.imread converted to RGB (the reference keeps BGR; we fix that)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"could not decode image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _gray_to_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def _load_skimage(name: str) -> np.ndarray:
    from skimage import data

    return _gray_to_rgb(getattr(data, name)())


# --------------------------------------------------------------------------------------------
# Fitting a texture to a target size
# --------------------------------------------------------------------------------------------
def tile_and_crop(texture: np.ndarray, size: Size, rng: np.random.Generator) -> np.ndarray:
    """Tile a (tileable) texture to cover ``size`` (H, W) and crop at a random offset."""
    height, width = size
    tex_h, tex_w = texture.shape[:2]
    reps_y = -(-(height + tex_h) // tex_h)
    reps_x = -(-(width + tex_w) // tex_w)
    tiled = np.tile(texture, (reps_y, reps_x, 1))
    off_y = int(rng.integers(0, tex_h))
    off_x = int(rng.integers(0, tex_w))
    return np.ascontiguousarray(tiled[off_y : off_y + height, off_x : off_x + width])


def resize_to(texture: np.ndarray, size: Size) -> np.ndarray:
    """Resize straight to ``size`` (H, W) as DRAEM does (area when shrinking, linear otherwise)."""
    height, width = size
    if texture.shape[:2] == (height, width):
        return texture.copy()
    shrinking = texture.shape[0] >= height and texture.shape[1] >= width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(texture, (width, height), interpolation=interpolation)


# --------------------------------------------------------------------------------------------
# Procedural generators (each returns uint8 H×W×3 for a given size)
# --------------------------------------------------------------------------------------------
def _random_colours(rng: np.random.Generator, n: int = 2, min_distance: float = 60.0) -> np.ndarray:
    """``n`` random RGB colours, the first two at least ``min_distance`` apart."""
    colours = rng.integers(0, 256, size=(n, 3)).astype(np.float32)
    if n >= 2 and np.linalg.norm(colours[0] - colours[1]) < min_distance:
        colours[1] = 255.0 - colours[0]
    return colours


def _two_tone(weight: np.ndarray, colours: np.ndarray) -> np.ndarray:
    weight = np.clip(weight, 0.0, 1.0)[..., None]
    return np.clip(colours[0] * (1.0 - weight) + colours[1] * weight, 0, 255).astype(np.uint8)


def _coords(size: Size) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float32)
    return yy, xx


def generate_stripes(rng: np.random.Generator, size: Size, *, period_range: tuple[float, float] = (4.0, 24.0)) -> np.ndarray:
    """Sinusoidal stripes with random orientation, period and colours."""
    yy, xx = _coords(size)
    angle = rng.uniform(0.0, np.pi)
    period = rng.uniform(*period_range)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    wave = np.sin(2.0 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
    sharpness = rng.uniform(1.0, 6.0)  # from soft sine to almost square stripes
    return _two_tone(0.5 + 0.5 * np.tanh(sharpness * wave), _random_colours(rng))


def generate_checkerboard(rng: np.random.Generator, size: Size, *, cell_range: tuple[int, int] = (3, 20)) -> np.ndarray:
    """Rotated checkerboard with a random cell size and colours."""
    yy, xx = _coords(size)
    angle = rng.uniform(0.0, np.pi / 2)
    cell = rng.uniform(*cell_range)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    board = (np.floor(u / cell) + np.floor(v / cell)) % 2
    return _two_tone(board, _random_colours(rng))


def generate_cloud(rng: np.random.Generator, size: Size, *, octaves: int = 5, persistence: float = 0.5) -> np.ndarray:
    """Fractal Perlin cloud (sum of octaves) mapped between two random colours."""
    total = np.zeros(size, dtype=np.float32)
    amplitude = 1.0
    base = int(rng.integers(1, 4))
    for octave in range(octaves):
        res = min(base * 2**octave, max(1, min(size) // 2))
        total += amplitude * perlin_noise(size, (res, res), rng)
        amplitude *= persistence
    span = float(total.max() - total.min()) or 1.0
    return _two_tone((total - total.min()) / span, _random_colours(rng))


def generate_scratches(rng: np.random.Generator, size: Size, *, n_lines_range: tuple[int, int] = (5, 40)) -> np.ndarray:
    """Random straight scratches of random thickness over a noisy background."""
    colours = _random_colours(rng, 3)
    height, width = size
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = colours[0]
    canvas += rng.normal(0.0, 8.0, size=canvas.shape)
    canvas = np.clip(canvas, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(n_lines_range[0], n_lines_range[1] + 1))):
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = colours[1] if rng.random() < 0.7 else colours[2]
        thickness = int(rng.integers(1, max(2, min(size) // 24) + 1))
        cv2.line(canvas, p1, p2, tuple(float(c) for c in colour), thickness, cv2.LINE_AA)
    return canvas


def generate_spots(rng: np.random.Generator, size: Size, *, density_range: tuple[float, float] = (0.002, 0.02)) -> np.ndarray:
    """Speckle: random filled discs of random radius and colour over a base colour."""
    colours = _random_colours(rng, 3)
    height, width = size
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = colours[0].astype(np.uint8)
    n_spots = max(1, int(rng.uniform(*density_range) * height * width))
    max_radius = max(2, min(size) // 12)
    for _ in range(n_spots):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        radius = int(rng.integers(1, max_radius + 1))
        colour = colours[1] if rng.random() < 0.6 else colours[2]
        cv2.circle(canvas, centre, radius, tuple(float(c) for c in colour), -1, cv2.LINE_AA)
    return canvas


def generate_cells(rng: np.random.Generator, size: Size, *, n_cells_range: tuple[int, int] = (8, 64)) -> np.ndarray:
    """Voronoi cells: each pixel takes the colour of its nearest seed, with dark cell edges."""
    height, width = size
    n_cells = int(rng.integers(n_cells_range[0], n_cells_range[1] + 1))
    seeds = rng.uniform((0, 0), (height, width), size=(n_cells, 2)).astype(np.float32)
    palette = rng.integers(0, 256, size=(n_cells, 3)).astype(np.float32)
    yy, xx = _coords(size)
    dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    order = np.argpartition(dist, 1, axis=-1)[..., :2]  # two nearest seeds, nearest first
    nearest = np.take_along_axis(dist, order, axis=-1)
    edge = np.sqrt(nearest[..., 1]) - np.sqrt(nearest[..., 0])  # ~0 on cell borders
    image = palette[order[..., 0]] * np.clip(edge / 2.0, 0.3, 1.0)[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


PROCEDURAL_GENERATORS: dict[str, TextureGenerator] = {
    "stripes": generate_stripes,
    "checkerboard": generate_checkerboard,
    "cloud": generate_cloud,
    "scratches": generate_scratches,
    "spots": generate_spots,
    "cells": generate_cells,
}


# --------------------------------------------------------------------------------------------
# Bank
# --------------------------------------------------------------------------------------------
@dataclass
class TextureSource:
    """One texture class.

    ``kind`` is ``"files"`` (DTD class folder, ``paths`` = image files, resized),
    ``"gimp"`` (``paths`` = .pat files, tiled), ``"skimage"`` (``skimage_name``) or
    ``"procedural"`` (``generator(rng, size)``).
    """

    name: str
    kind: str
    paths: tuple[str, ...] | None = None
    skimage_name: str | None = None
    generator: TextureGenerator | None = None
    tileable: bool = False


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def dtd_sources(dtd_root: str | Path) -> list[TextureSource]:
    """One source per class folder of ``<root>/<class>/*`` or ``<root>/images/<class>/*``."""
    root = Path(dtd_root)
    if not root.is_dir():
        raise FileNotFoundError(f"DTD root {root} does not exist or is not a directory")
    if (root / "images").is_dir():
        root = root / "images"
    sources = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = _image_files(folder)
        if not files:
            logger.debug("DTD class folder %s has no images; skipped", folder)
            continue
        sources.append(TextureSource(folder.name, KIND_FILES, paths=tuple(str(p) for p in files)))
    if not sources:
        raise FileNotFoundError(
            f"no texture images ({', '.join(IMAGE_SUFFIXES)}) found in class folders under {root}; "
            "expected <root>/<class>/*.jpg or <root>/images/<class>/*.jpg"
        )
    return sources


def gimp_sources(gimp_dirs: Sequence[str | Path], max_patterns: int | None = None) -> list[TextureSource]:
    """One source per ``.pat`` file found (recursively) under existing ``gimp_dirs``."""
    files: list[Path] = []
    for directory in gimp_dirs:
        directory = Path(directory)
        if directory.is_dir():
            files.extend(sorted(directory.rglob("*.pat")))
    if max_patterns is not None:
        files = files[:max_patterns]
    sources, seen = [], set()
    for path in files:
        name = f"gimp:{path.stem}"
        if name in seen:
            name = f"gimp:{path.parent.name}/{path.stem}"
        seen.add(name)
        sources.append(TextureSource(name, KIND_GIMP, paths=(str(path),), tileable=True))
    return sources


class TextureBank:
    """A set of texture classes; images are decoded lazily and cached."""

    def __init__(self, sources: Sequence[TextureSource]):
        if not sources:
            raise ValueError("a TextureBank needs at least one texture source")
        self.sources = list(sources)
        self._by_name = {source.name: source for source in self.sources}
        if len(self._by_name) != len(self.sources):
            raise ValueError("texture source names must be unique")
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_parameters(cls, textures: dict) -> TextureBank:
        """The bank described by the ``synthesis.textures`` parameter block."""
        return cls.from_sources(
            textures.get("dtd_root") or None,
            use_skimage=textures["use_skimage"],
            gimp_dirs=tuple(textures["gimp_dirs"]),
            procedural=textures["procedural"],
        )

    @classmethod
    def from_sources(
        cls,
        dtd_root: str | Path | None = None,
        *,
        use_skimage: bool = True,
        gimp_dirs: Sequence[str | Path] = DEFAULT_GIMP_DIRS,
        procedural: bool = True,
        max_gimp_patterns: int | None = None,
    ) -> TextureBank:
        """DTD classes when ``dtd_root`` is given (only those); else skimage + GIMP + procedural."""
        if dtd_root is not None:
            return cls(dtd_sources(dtd_root))
        sources: list[TextureSource] = []
        if use_skimage:
            sources += [TextureSource(f"skimage:{n}", KIND_SKIMAGE, skimage_name=n) for n in SKIMAGE_TEXTURES]
        sources += gimp_sources(gimp_dirs, max_gimp_patterns)
        if procedural:
            sources += [
                TextureSource(f"procedural:{n}", KIND_PROCEDURAL, generator=g) for n, g in PROCEDURAL_GENERATORS.items()
            ]
        return cls(sources)

    @property
    def class_names(self) -> list[str]:
        return [source.name for source in self.sources]

    def __len__(self) -> int:
        return len(self.sources)

    def _load(self, key: str, loader: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = loader()
        return self._cache[key]

    def sample_class(self, name: str, rng: np.random.Generator, size: Size) -> np.ndarray:
        """A random texture of class ``name`` fitted to ``size`` (H, W), uint8 RGB."""
        source = self._by_name.get(name)
        if source is None:
            raise KeyError(f"unknown texture class {name!r}")
        size = (int(size[0]), int(size[1]))
        if source.kind == KIND_PROCEDURAL:
            assert source.generator is not None
            return source.generator(rng, size)
        if source.kind == KIND_SKIMAGE:
            assert source.skimage_name is not None
            texture = self._load(f"skimage:{source.skimage_name}", lambda: _load_skimage(source.skimage_name))
        else:
            assert source.paths
            path = source.paths[int(rng.integers(0, len(source.paths)))]
            reader = read_gimp_pattern if source.kind == KIND_GIMP else read_rgb_image
            texture = self._load(path, lambda: reader(path))
        return tile_and_crop(texture, size, rng) if source.tileable else resize_to(texture, size)

    def sample(self, rng: np.random.Generator, size: Size) -> tuple[np.ndarray, str]:
        """A random class, then a random texture of it; returns (texture, class name)."""
        name = self.sources[int(rng.integers(0, len(self.sources)))].name
        return self.sample_class(name, rng, size), name


# --------------------------------------------------------------------------------------------
# DRAEM texture augmenter (numpy/OpenCV re-implementation of the imgaug ops)
# --------------------------------------------------------------------------------------------
GAMMA_RANGE = (0.5, 2.0)
BRIGHTNESS_MUL_RANGE = (0.8, 1.2)
BRIGHTNESS_ADD_RANGE = (-30.0, 30.0)
SHARPNESS_RANGE = (0.0, 2.0)
HUE_SATURATION_RANGE = (-50, 50)
SOLARIZE_THRESHOLD_RANGE = (32, 128)
SOLARIZE_PROBABILITY = 0.5
POSTERIZE_BITS_RANGE = (1, 8)
AUTOCONTRAST_CUTOFF_RANGE = (0.0, 20.0)
AFFINE_ROTATION_RANGE = (-45.0, 45.0)


def _apply_lut(image: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """Apply one 256-entry LUT per channel (luts shape (3, 256))."""
    out = np.empty_like(image)
    for channel in range(3):
        out[..., channel] = luts[channel][image[..., channel]]
    return out


def gamma_contrast(image: np.ndarray, rng: np.random.Generator, *, gamma_range: tuple[float, float] = GAMMA_RANGE) -> np.ndarray:
    """255·(x/255)^γ with an independent γ per channel."""
    gammas = rng.uniform(*gamma_range, size=3)
    levels = np.arange(256, dtype=np.float64) / 255.0
    luts = np.clip(np.rint(255.0 * levels[None, :] ** gammas[:, None]), 0, 255).astype(np.uint8)
    return _apply_lut(image, luts)


def multiply_and_add_brightness(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    mul_range: tuple[float, float] = BRIGHTNESS_MUL_RANGE,
    add_range: tuple[float, float] = BRIGHTNESS_ADD_RANGE,
) -> np.ndarray:
    """Scale and shift the luma (Y of YCrCb), leaving chroma unchanged."""
    mul = rng.uniform(*mul_range)
    add = rng.uniform(*add_range)
    ycrcb = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    ycrcb[..., 0] = np.clip(ycrcb[..., 0] * mul + add, 0, 255)
    return cv2.cvtColor(np.rint(ycrcb).astype(np.uint8), cv2.COLOR_YCrCb2RGB)


def enhance_sharpness(image: np.ndarray, rng: np.random.Generator, *, factor_range: tuple[float, float] = SHARPNESS_RANGE) -> np.ndarray:
    """PIL ImageEnhance.Sharpness: blend with the PIL 'smooth' filter by a factor in (0, 2)."""
    factor = rng.uniform(*factor_range)
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0
    degenerate = cv2.filter2D(image.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REPLICATE)
    degenerate[0, :], degenerate[-1, :] = image[0, :], image[-1, :]  # PIL keeps the border pixels
    degenerate[:, 0], degenerate[:, -1] = image[:, 0], image[:, -1]
    out = degenerate + factor * (image.astype(np.float32) - degenerate)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def add_to_hue_and_saturation(
    image: np.ndarray, rng: np.random.Generator, *, value_range: tuple[int, int] = HUE_SATURATION_RANGE
) -> np.ndarray:
    """Add independent random values to hue (wrapping, 0–255 scale) and saturation (clipped)."""
    hue_shift, sat_shift = rng.integers(value_range[0], value_range[1] + 1, size=2)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + hue_shift) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + sat_shift, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)


def solarize(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    threshold_range: tuple[int, int] = SOLARIZE_THRESHOLD_RANGE,
    probability: float = SOLARIZE_PROBABILITY,
) -> np.ndarray:
    """With ``probability``, invert pixels at or above a threshold drawn from ``threshold_range``."""
    threshold = rng.integers(threshold_range[0], threshold_range[1] + 1)
    if rng.random() >= probability:
        return image.copy()
    return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def posterize(image: np.ndarray, rng: np.random.Generator, *, bits_range: tuple[int, int] = POSTERIZE_BITS_RANGE) -> np.ndarray:
    """Keep only the top ``bits`` bits of each channel, bits drawn from ``bits_range``."""
    bits = int(rng.integers(bits_range[0], bits_range[1] + 1))
    keep = np.uint8((0xFF << (8 - bits)) & 0xFF)
    return image & keep


def invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:  # noqa: ARG001 - uniform op signature
    """255 − x."""
    return (255 - image).astype(np.uint8)


def autocontrast(
    image: np.ndarray, rng: np.random.Generator, *, cutoff_range: tuple[float, float] = AUTOCONTRAST_CUTOFF_RANGE
) -> np.ndarray:
    """PIL-style autocontrast per channel, clipping ``cutoff``% at each end of the histogram."""
    cutoff = rng.uniform(*cutoff_range)
    luts = np.tile(np.arange(256, dtype=np.uint8), (3, 1))
    levels = np.arange(256, dtype=np.float64)
    for channel in range(3):
        low, high = np.percentile(image[..., channel], (cutoff, 100.0 - cutoff))
        if high > low:
            luts[channel] = np.clip(np.rint((levels - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)
    return _apply_lut(image, luts)


def equalize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:  # noqa: ARG001
    """Histogram equalisation of each channel (as PIL ImageOps.equalize)."""
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(image[..., c])) for c in range(3)], axis=-1)


def affine_rotate(
    image: np.ndarray, rng: np.random.Generator, *, angle_range: tuple[float, float] = AFFINE_ROTATION_RANGE
) -> np.ndarray:
    """Rotate about the centre by U(angle_range) degrees; reflect border (imgaug pads black)."""
    return rotate_about_center(image, rng.uniform(*angle_range), border=cv2.BORDER_REFLECT_101)


AUGMENT_OPS: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    gamma_contrast,
    multiply_and_add_brightness,
    enhance_sharpness,
    add_to_hue_and_saturation,
    solarize,
    posterize,
    invert,
    autocontrast,
    equalize,
    affine_rotate,
)


def augment_texture(texture: np.ndarray, rng: np.random.Generator, *, n_ops: int = 3) -> np.ndarray:
    """DRAEM randAugmenter: ``n_ops`` distinct ops of ``AUGMENT_OPS`` applied in the drawn order."""
    if not 0 <= n_ops <= len(AUGMENT_OPS):
        raise ValueError(f"n_ops must be in [0, {len(AUGMENT_OPS)}], got {n_ops}")
    out = np.ascontiguousarray(texture, dtype=np.uint8)
    for index in rng.choice(len(AUGMENT_OPS), size=n_ops, replace=False):
        out = AUGMENT_OPS[int(index)](out, rng)
    return out
