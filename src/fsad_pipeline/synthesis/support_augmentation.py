"""Deterministic support-set augmentation for memory-bank scorers (methods.md §7).

RegAD / the nehaejaz thesis expand each of the k support images into 22 views (original,
8 rotations, 8 translations, horizontal flip, grayscale, 3 × rot90) and permute them randomly;
for a memory bank the order is irrelevant, so here it is fixed. Optional multiplicative
brightness and contrast factors extend the set (2 + 2 views by default, 26 in all).

Geometric warps use reflection padding (``BORDER_REFLECT_101``), never black borders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)

# RegAD: θ ∈ {±π/16, ±π/8, ±3π/16, ±π/4}.
ROTATION_ANGLES: tuple[float, ...] = (11.25, -11.25, 22.5, -22.5, 33.75, -33.75, 45.0, -45.0)
# RegAD: (a, b) ∈ {(±0.1, ±0.1), (±0.2, ±0.2)} in affine_grid units (0.2 = 10 % of the size).
TRANSLATION_MAGNITUDES: tuple[float, ...] = (0.1, 0.2)
_SIGN_COMBOS: tuple[tuple[int, int], ...] = ((1, 1), (1, -1), (-1, 1), (-1, -1))
# kornia rgb_to_grayscale weights.
GRAY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass
class SupportAugmentationConfig:
    """Which augmentations to apply to every support image.

    Attributes:
        rotations: 8 rotations by ±11.25°, ±22.5°, ±33.75°, ±45° (reflection padding).
        rot90: rotations by 90°, 180°, 270° (non-square images are resized back to H×W).
        translations: shifts (±0.1, ±0.1) and (±0.2, ±0.2) in affine_grid units, i.e. ±5 % and
            ±10 % of the width/height, all four sign combinations each (reflection padding).
        hflip: horizontal flip.
        grayscale: ITU-R 601 luma (0.299, 0.587, 0.114) replicated to 3 channels.
        brightness: multiplicative brightness factors, one view each; empty = off.
        contrast: contrast factors (blend with the image's mean grey), one view each; empty = off.
        include_original: keep the un-augmented image as the first view.
    """

    rotations: bool = True
    rot90: bool = True
    translations: bool = True
    hflip: bool = True
    grayscale: bool = True
    brightness: tuple[float, ...] = field(default=(0.8, 1.2))
    contrast: tuple[float, ...] = field(default=(0.8, 1.2))
    include_original: bool = True

    def __post_init__(self) -> None:
        self.brightness = tuple(float(value) for value in (self.brightness or ()))
        self.contrast = tuple(float(value) for value in (self.contrast or ()))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SupportAugmentationConfig:
        """Build from a (parameters.yml) mapping; unknown keys raise ``ValueError``."""
        data = dict(data or {})
        known = {item.name for item in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown support augmentation options: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly mapping (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()
        }


# --------------------------------------------------------------------------------------------
# Single-image transforms (uint8 H×W×3 in, uint8 H×W×3 out)
# --------------------------------------------------------------------------------------------


def _warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    return cv2.warpAffine(
        np.ascontiguousarray(image),
        matrix.astype(np.float64),
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT_101,
    )


def rotate(image: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate about the image centre (counter-clockwise for positive angles), reflected border."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), float(angle_deg), 1.0)
    return _warp(image, matrix)


def translate(image: np.ndarray, shift_x: float, shift_y: float) -> np.ndarray:
    """Shift by ``(shift_x, shift_y)`` in affine_grid units (1.0 = half the width/height)."""
    height, width = image.shape[:2]
    matrix = np.array([[1.0, 0.0, shift_x * width / 2.0], [0.0, 1.0, shift_y * height / 2.0]])
    return _warp(image, matrix)


def rotate90(image: np.ndarray, times: int) -> np.ndarray:
    """``np.rot90`` ``times`` times; a non-square result is resized back to the input H×W."""
    height, width = image.shape[:2]
    rotated = np.ascontiguousarray(np.rot90(image, k=times, axes=(0, 1)))
    if rotated.shape[:2] != (height, width):
        rotated = cv2.resize(rotated, (width, height), interpolation=cv2.INTER_LINEAR)
    return rotated


def horizontal_flip(image: np.ndarray) -> np.ndarray:
    """Mirror left-right."""
    return np.ascontiguousarray(image[:, ::-1])


def _luma(image: np.ndarray) -> np.ndarray:
    weights = np.asarray(GRAY_WEIGHTS, dtype=np.float32)
    return image.astype(np.float32) @ weights


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """Luma replicated to three identical channels."""
    gray = np.clip(np.rint(_luma(image)), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Multiply all intensities by ``factor`` and clip to [0, 255]."""
    return np.clip(np.rint(image.astype(np.float32) * factor), 0, 255).astype(np.uint8)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level: ``mean + factor·(image − mean)``, clipped (torchvision style)."""
    mean_grey = float(_luma(image).mean())
    blended = mean_grey + factor * (image.astype(np.float32) - mean_grey)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# The augmentation list
# --------------------------------------------------------------------------------------------


def _format(value: float) -> str:
    return f"{value:+g}"


def _transforms(config: SupportAugmentationConfig) -> Iterator[tuple[str, Transform]]:
    """(name, transform) pairs in the fixed output order."""
    if config.include_original:
        yield "original", lambda image: image.copy()
    if config.rotations:
        for angle in ROTATION_ANGLES:
            yield f"rotate{_format(angle)}", lambda image, angle=angle: rotate(image, angle)
    if config.rot90:
        for times in (1, 2, 3):
            yield f"rot90x{times}", lambda image, times=times: rotate90(image, times)
    if config.translations:
        for magnitude in TRANSLATION_MAGNITUDES:
            for sign_x, sign_y in _SIGN_COMBOS:
                shift_x, shift_y = sign_x * magnitude, sign_y * magnitude
                yield (
                    f"translate{_format(shift_x)}{_format(shift_y)}",
                    lambda image, sx=shift_x, sy=shift_y: translate(image, sx, sy),
                )
    if config.hflip:
        yield "hflip", horizontal_flip
    if config.grayscale:
        yield "grayscale", to_grayscale
    for factor in config.brightness:
        yield f"brightness{factor:g}", lambda image, factor=factor: adjust_brightness(image, factor)
    for factor in config.contrast:
        yield f"contrast{factor:g}", lambda image, factor=factor: adjust_contrast(image, factor)


def augmentation_names(config: SupportAugmentationConfig | None = None) -> list[str]:
    """Names of the views produced per support image, in output order."""
    return [name for name, _ in _transforms(config or SupportAugmentationConfig())]


def augment_support(
    images: np.ndarray, config: SupportAugmentationConfig | None = None
) -> np.ndarray:
    """Expand ``k`` support images (k, H, W, 3) uint8 into ``k·n`` views (k·n, H, W, 3) uint8.

    Image-major order: rows ``i·n … i·n + n − 1`` are the ``n`` views of image ``i`` in the order
    of :func:`augmentation_names`. Deterministic (no randomness).
    """
    config = config or SupportAugmentationConfig()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (k, H, W, 3) images, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    transforms = list(_transforms(config))
    if not transforms:
        raise ValueError("support augmentation config selects no view at all")
    count, height, width = images.shape[:3]
    output = np.empty((count * len(transforms), height, width, 3), dtype=np.uint8)
    for image_index, image in enumerate(images):
        for view_index, (_, transform) in enumerate(transforms):
            output[image_index * len(transforms) + view_index] = transform(image)
    logger.debug("augmented %d support images into %d views", count, len(output))
    return output
