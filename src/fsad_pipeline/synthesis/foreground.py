"""Foreground masks that restrict where pseudo-anomalies are pasted (methods.md §2)."""

from __future__ import annotations

import logging

import cv2
import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

FOREGROUND_METHODS = ("auto", "otsu_bright", "otsu_dark", "border_flood", "grabcut", "none")


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H×W×3 RGB image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def otsu_mask(image: np.ndarray, *, bright: bool = True) -> np.ndarray:
    """Otsu split of the grey image: bright = gray > t (DFD bg_reverse=true), else the complement."""
    _, above = cv2.threshold(_gray(image), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    above = above.astype(np.uint8)
    return above if bright else (1 - above).astype(np.uint8)


def border_flood_mask(
    image: np.ndarray,
    *,
    lo_diff: tuple[int, int, int] = (80, 80, 80),
    up_diff: tuple[int, int, int] = (50, 50, 50),
) -> np.ndarray:
    """Foreground = pixels not reached by a fixed-range 4-connected flood fill from any corner."""
    height, width = image.shape[:2]
    reached = np.zeros((height, width), dtype=np.uint8)
    flags = 4 | cv2.FLOODFILL_FIXED_RANGE | cv2.FLOODFILL_MASK_ONLY | (1 << 8)
    for seed in ((0, 0), (width - 1, 0), (0, height - 1), (width - 1, height - 1)):
        fill = np.zeros((height + 2, width + 2), dtype=np.uint8)
        cv2.floodFill(image.copy(), fill, seed, (0, 0, 0), tuple(lo_diff), tuple(up_diff), flags)
        reached |= fill[1:-1, 1:-1]
    return (1 - reached).astype(np.uint8)


def grabcut_mask(image: np.ndarray, *, margin_fraction: float = 0.05, iterations: int = 10) -> np.ndarray:
    """cv2.grabCut initialised with the image rectangle inset by ``margin_fraction`` per side."""
    height, width = image.shape[:2]
    margin_y = max(1, int(round(height * margin_fraction)))
    margin_x = max(1, int(round(width * margin_fraction)))
    rect = (margin_x, margin_y, max(1, width - 2 * margin_x), max(1, height - 2 * margin_y))
    labels = np.zeros((height, width), dtype=np.uint8)
    bgd_model = np.zeros((1, 65), dtype=np.float64)
    fgd_model = np.zeros((1, 65), dtype=np.float64)
    cv2.grabCut(image, labels, rect, bgd_model, fgd_model, iterations, cv2.GC_INIT_WITH_RECT)
    return ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8)


def clean_mask(mask: np.ndarray, *, kernel_fraction: float = 0.02, fill_holes: bool = True) -> np.ndarray:
    """Morphological open then close (elliptic kernel ~``kernel_fraction`` of the short side), fill holes."""
    size = max(3, int(round(min(mask.shape) * kernel_fraction)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    cleaned = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    cleaned = cv2.morphologyEx(cleaned, cv2.MORPH_CLOSE, kernel)
    if fill_holes:
        cleaned = ndimage.binary_fill_holes(cleaned > 0)
    return np.asarray(cleaned, dtype=np.uint8)


def _border_ring(array: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate(
        [array[:width].ravel(), array[-width:].ravel(), array[:, :width].ravel(), array[:, -width:].ravel()]
    )


def auto_mask(
    image: np.ndarray,
    *,
    border_fraction: float = 0.05,
    border_std_threshold: float = 25.0,
    max_border_foreground: float = 0.1,
    min_fraction: float = 0.02,
    max_fraction: float = 0.95,
) -> np.ndarray | None:
    """Otsu foreground when the border looks like a plain background, else ``None``.

    The border ring (``border_fraction`` of the short side) must have a grey std below
    ``border_std_threshold``; the Otsu polarity is chosen opposite to the border; the result
    is accepted when at most ``max_border_foreground`` of the ring is foreground and the
    foreground fraction lies in [min_fraction, max_fraction].
    """
    gray = _gray(image)
    ring_width = max(1, int(round(min(gray.shape) * border_fraction)))
    ring = _border_ring(gray, ring_width).astype(np.float64)
    if ring.std() > border_std_threshold:
        return None
    threshold, _ = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = otsu_mask(image, bright=bool(ring.mean() <= threshold))
    if _border_ring(mask, ring_width).mean() > max_border_foreground:
        return None
    fraction = float(mask.mean())
    if not min_fraction <= fraction <= max_fraction:
        return None
    return mask


def foreground_mask(
    image: np.ndarray,
    method: str = "auto",
    *,
    min_fraction: float = 0.02,
    max_fraction: float = 0.95,
    border_fraction: float = 0.05,
    border_std_threshold: float = 25.0,
    max_border_foreground: float = 0.1,
    cleanup: bool | None = None,
    cleanup_kernel_fraction: float = 0.02,
    flood_lo_diff: tuple[int, int, int] = (80, 80, 80),
    flood_up_diff: tuple[int, int, int] = (50, 50, 50),
    grabcut_margin_fraction: float = 0.05,
    grabcut_iterations: int = 10,
) -> np.ndarray:
    """Foreground mask (uint8 {0,1}, H×W) of an RGB image by one of ``FOREGROUND_METHODS``.

    ``auto`` returns the Otsu object mask on a plain background and all ones otherwise
    (textures). ``cleanup`` (open/close/fill holes) defaults to on for ``auto`` only; DFD's
    own Otsu masks are raw. A mask covering less than ``min_fraction`` is replaced by all
    ones, so the result is never empty.
    """
    image = _check_image(image)
    height, width = image.shape[:2]
    ones = np.ones((height, width), dtype=np.uint8)
    if method not in FOREGROUND_METHODS:
        raise ValueError(f"unknown foreground method {method!r}; choose one of {FOREGROUND_METHODS}")
    if method == "none":
        return ones
    if method == "auto":
        mask = auto_mask(
            image,
            border_fraction=border_fraction,
            border_std_threshold=border_std_threshold,
            max_border_foreground=max_border_foreground,
            min_fraction=min_fraction,
            max_fraction=max_fraction,
        )
        if mask is None:
            return ones
    elif method == "otsu_bright":
        mask = otsu_mask(image, bright=True)
    elif method == "otsu_dark":
        mask = otsu_mask(image, bright=False)
    elif method == "border_flood":
        mask = border_flood_mask(image, lo_diff=flood_lo_diff, up_diff=flood_up_diff)
    else:
        mask = grabcut_mask(image, margin_fraction=grabcut_margin_fraction, iterations=grabcut_iterations)

    if cleanup if cleanup is not None else method == "auto":
        mask = clean_mask(mask, kernel_fraction=cleanup_kernel_fraction)
    if float(mask.mean()) < min_fraction:
        logger.warning(
            "foreground method %r covers %.3f%% < min_fraction %.3f%%; using the whole image",
            method,
            100.0 * float(mask.mean()),
            100.0 * min_fraction,
        )
        return ones
    return mask.astype(np.uint8)
