"""The one image and mask reader of the project.

Every image that enters the pipeline goes through :func:`read_image`, which decodes the whole
file (so truncated files are caught here, not in the middle of training), guards against
decompression bombs, and converts whatever it finds (grayscale, palette, RGBA, 16-bit) to
8-bit RGB. Problems raise :class:`BadImageError`, whose message names the file.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fsad_pipeline.data.geometry import as_hw

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: Default decompression-bomb guard: images with more pixels than this are refused.
DEFAULT_MAX_PIXELS = 40_000_000


class BadImageError(ValueError):
    """An image or mask that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (empty if the folder is missing)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image_file(p))


_PIL_GUARD_LOCK = threading.Lock()


@contextmanager
def pil_guard_off() -> Iterator[None]:
    """PIL's own decompression-bomb limit off while a file's header is read (restored after).

    Without this, an image between PIL's limit (2 x ~89 MP) and a larger ``data.max_pixels``
    was refused with PIL's message, and the configured guard was not the one that applied.
    """
    with _PIL_GUARD_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _open_fully(path: Path, max_pixels: int) -> Image.Image:
    """Open and decode the whole file, raising BadImageError for every way it can fail."""
    if not path.exists():
        raise BadImageError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise BadImageError(path, "zero-byte file")
    return _decode(path, path, max_pixels)


def _decode(source: Path | io.BytesIO, name: str | Path, max_pixels: int) -> Image.Image:
    """Open ``source`` (a file or an in-memory buffer), check the pixel guard, decode everything."""
    try:
        with warnings.catch_warnings():
            # PIL warns (and errors at 2x its own MAX_IMAGE_PIXELS, when the header is read) for
            # big images; the guard that counts is data.max_pixels, applied below, not PIL's.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with pil_guard_off():
                image = Image.open(source)
            width, height = image.size
            if width * height > max_pixels:
                raise BadImageError(
                    name,
                    f"{width}x{height} = {width * height} pixels exceeds the decompression-bomb "
                    f"guard of {max_pixels} pixels (raise data.max_pixels if this is intended)",
                )
            image.load()  # full decode: catches truncated and corrupt data
            if exif_orientation(image) != 1:  # a camera JPEG stored sideways: as it is displayed
                image = ImageOps.exif_transpose(image)
    except BadImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(name, f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    return image


#: EXIF orientations that turn the image by 90 degrees (width and height swap when displayed).
QUARTER_TURN_ORIENTATIONS = (5, 6, 7, 8)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored, the default when there is none)."""
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is no orientation
        return 1


def _to_uint8(array: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
    """Scale an integer array of ``bit_depth`` bits (default: its dtype's width) or a float array
    (min-max: floats declare no range) to uint8. Integer data are scaled by the *declared* depth,
    never by their content: two images that differ by one grey level stay one level apart."""
    if array.dtype == np.uint8 and bit_depth in (None, 8):
        return array
    if np.issubdtype(array.dtype, np.integer):
        bits = int(bit_depth) if bit_depth else 8 * array.dtype.itemsize
        top = float(2**bits - 1)
        return np.clip(np.round(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    array = array.astype(np.float64)
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    scaled = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    return np.round(np.nan_to_num(scaled) * 255).astype(np.uint8)


def declared_bit_depth(image: Image.Image) -> int | None:
    """The container bit depth a deep grayscale image declares: 16 for ``I;16*`` (and ``I`` from a
    PNG, whose samples are at most 16 bits), otherwise 32; None for other modes.

    A PNG ``sBIT`` chunk (e.g. 12 significant bits) does not change the scale: the PNG
    specification stores such samples scaled up to the full 16 bits. Camera files that keep
    12-bit values unscaled in a 16-bit container are not recognisable from the file (a
    configured bit depth would be needed; see the README's limits)."""
    if not image.mode.startswith("I"):
        return None
    if image.mode.startswith("I;16") or image.format == "PNG":
        return 16
    return 32


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image as uint8 H×W×3 RGB, converting grayscale, palette, alpha and 16-bit data."""
    image, _ = read_image_with_note(path, max_pixels=max_pixels)
    return image


def read_image_with_note(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, str]:
    """Like :func:`read_image`, also returning a note such as ``"converted from I;16"``."""
    path = Path(path)
    return _to_rgb(_open_fully(path, max_pixels), path)


def decode_image_with_note(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "upload"
) -> tuple[np.ndarray, str]:
    """:func:`read_image_with_note` for an encoded image held in memory (an HTTP upload): the same
    guard, full decode and conversion to 8-bit RGB; problems raise :class:`BadImageError` named ``name``."""
    if not data:
        raise BadImageError(name, "zero-byte file")
    return _to_rgb(_decode(io.BytesIO(data), name, max_pixels), name)


def _to_rgb(image: Image.Image, name: str | Path) -> tuple[np.ndarray, str]:
    """A decoded image as uint8 H×W×3 RGB and the conversion note."""
    mode = image.mode
    if mode in ("RGB",):
        array = np.asarray(image, dtype=np.uint8)
    elif mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grayscale
        gray = _to_uint8(np.asarray(image), declared_bit_depth(image))
        array = np.repeat(gray[..., None], 3, axis=2)
    elif mode == "RGBA" or mode == "LA" or (mode == "P" and "transparency" in image.info):
        # Alpha is dropped: industrial captures carry no meaningful transparency.
        array = np.asarray(image.convert("RGBA").convert("RGB"), dtype=np.uint8)
    else:  # L, 1, P, CMYK, YCbCr, ...
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise BadImageError(name, f"unexpected decoded shape {array.shape}")
    note = "" if mode == "RGB" else f"converted from {mode}"
    return np.ascontiguousarray(array), note


def read_mask(
    path: str | Path,
    *,
    expected_size: tuple[int, int] | None = None,
    threshold: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read a ground-truth mask as uint8 H×W in {0, 1} (pixels > ``threshold`` are defect).

    ``expected_size`` is (width, height) of the image the mask belongs to; a mismatch raises
    BadImageError naming both sizes.
    """
    path = Path(path)
    image = _open_fully(path, max_pixels)
    if expected_size is not None and tuple(image.size) != tuple(expected_size):
        raise BadImageError(
            path,
            f"mask is {image.size[0]}x{image.size[1]} but its image is "
            f"{expected_size[0]}x{expected_size[1]}",
        )
    array = np.asarray(image)
    if array.ndim == 3:
        array = array[..., :3].max(axis=2) if array.shape[2] >= 3 else array[..., 0]
    if array.dtype == bool:  # a 1-bit mask: True is defect, whatever the rest of the mask holds
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):  # floats: [0, 1] is the 8-bit scale / 255
        top = 1.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else 255.0
        return (np.nan_to_num(array.astype(np.float64)) * (255.0 / top) > threshold).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        # Compared on the 8-bit scale without rounding: a 16-bit mask of 0/1 keeps its 1s.
        top = float(2 ** (declared_bit_depth(image) or 8 * array.dtype.itemsize) - 1)
        return (array.astype(np.float64) * (255.0 / top) > threshold).astype(np.uint8)
    return (_to_uint8(array) > threshold).astype(np.uint8)


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an H×W×3 uint8 image to ``size`` (int → square, or (height, width)); area when shrinking."""
    import cv2

    height, width = as_hw(size)
    if image.shape[:2] == (height, width):
        return image
    shrinking = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a {0,1} mask: nearest-neighbour when enlarging; when shrinking, a target pixel is
    defect if any source pixel under it is (area average > 0), so a 1-3 px scratch or a small
    speckle is not erased by the sampling grid."""
    import cv2

    height, width = as_hw(size)
    if mask.shape[:2] == (height, width):
        return mask
    if height <= mask.shape[0] and width <= mask.shape[1]:
        area = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
        return (area > 0).astype(np.uint8)
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
