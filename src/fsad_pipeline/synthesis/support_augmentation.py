"""Deterministic support-set augmentation for memory-bank scorers (methods.md §7).

RegAD / the nehaejaz thesis expand each of the k support images into 22 views (original,
8 rotations, 8 translations, horizontal flip, grayscale, 3 × rot90) and permute them randomly;
for a memory bank the order is irrelevant, so here it is fixed. Optional multiplicative
brightness and contrast factors extend the set (2 + 2 views by default, 26 in all). Images that
are not square keep their shape: of the quarter turns only the half turn applies (24 views).

Geometric warps use reflection padding (``BORDER_REFLECT_101``), never black borders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import cv2
import numpy as np

from .anomalies import ORIGINAL_VIEW, PseudoAnomalySet

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
        rot90: rotations by 90°, 180°, 270°; a non-square image gets 180° only (a quarter turn
            would have to be squashed back into H×W, and such a view looks like no real part:
            on KolektorSDD the squashed views of a real crack scored below every good image).
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


def _transforms(config: SupportAugmentationConfig, square: bool = True) -> Iterator[tuple[str, Transform, bool]]:
    """(name, transform, geometric) triples in the fixed output order (``square``: of images with H = W).

    ``geometric`` views move pixels (a defect mask must follow them); the others only change
    intensities (a mask stays as it is).
    """
    if config.include_original:
        yield ORIGINAL_VIEW, lambda image: image.copy(), True
    if config.rotations:
        for angle in ROTATION_ANGLES:
            yield f"rotate{_format(angle)}", lambda image, angle=angle: rotate(image, angle), True
    if config.rot90:
        for times in (1, 2, 3) if square else (2,):
            yield f"rot90x{times}", lambda image, times=times: rotate90(image, times), True
    if config.translations:
        for magnitude in TRANSLATION_MAGNITUDES:
            for sign_x, sign_y in _SIGN_COMBOS:
                shift_x, shift_y = sign_x * magnitude, sign_y * magnitude
                yield (
                    f"translate{_format(shift_x)}{_format(shift_y)}",
                    lambda image, sx=shift_x, sy=shift_y: translate(image, sx, sy),
                    True,
                )
    if config.hflip:
        yield "hflip", horizontal_flip, True
    if config.grayscale:
        yield "grayscale", to_grayscale, False
    for factor in config.brightness:
        yield f"brightness{factor:g}", lambda image, factor=factor: adjust_brightness(image, factor), False
    for factor in config.contrast:
        yield f"contrast{factor:g}", lambda image, factor=factor: adjust_contrast(image, factor), False


def augmentation_names(config: SupportAugmentationConfig | None = None, *, square: bool = True) -> list[str]:
    """Names of the views produced per support image (of images with H = W, or not), in output order."""
    return [name for name, _, _ in _transforms(config or SupportAugmentationConfig(), square)]


def augment_support(
    images: np.ndarray, config: SupportAugmentationConfig | None = None
) -> np.ndarray:
    """Expand ``k`` support images (k, H, W, 3) uint8 into ``k·n`` views (k·n, H, W, 3) uint8.

    Image-major order: rows ``i·n … i·n + n − 1`` are the ``n`` views of image ``i`` in the order
    of :func:`augmentation_names` (``square`` = H equals W). Deterministic (no randomness).
    """
    config = config or SupportAugmentationConfig()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (k, H, W, 3) images, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    count, height, width = images.shape[:3]
    transforms = list(_transforms(config, square=height == width))
    if not transforms:
        raise ValueError("support augmentation config selects no view at all")
    output = np.empty((count * len(transforms), height, width, 3), dtype=np.uint8)
    for image_index, image in enumerate(images):
        for view_index, (_, transform, _) in enumerate(transforms):
            output[image_index * len(transforms) + view_index] = transform(image)
    logger.debug("augmented %d support images into %d views", count, len(output))
    return output


def augment_labelled_defects(
    images: np.ndarray, masks: np.ndarray | None, config: SupportAugmentationConfig
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Views of labelled defect images (k, H, W, 3) and their masks (k, H, W) {0, 1} or ``None``.

    The same views as :func:`augment_support`, image-major; a mask follows the geometric views
    (same warp, nearest-neighbour decision at 0.5) and is unchanged by the photometric ones.
    Returns ``(views, view_masks or None, shot_index)`` where ``shot_index[i]`` is the defect
    image view ``i`` was made from.
    """
    views = augment_support(images, config)
    per_image = len(views) // max(len(images), 1)
    shot_index = np.repeat(np.arange(len(images), dtype=np.int64), per_image)
    if masks is None:
        return views, None, shot_index
    masks = np.asarray(masks)
    if masks.shape != images.shape[:3]:
        raise ValueError(f"masks {masks.shape} do not match images {images.shape}")
    view_masks = np.empty((len(views), *masks.shape[1:]), dtype=np.uint8)
    row = 0
    for mask in masks:
        mask3 = np.repeat((mask > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)
        for _, transform, geometric in _transforms(config, square=mask.shape[0] == mask.shape[1]):
            moved = transform(mask3) if geometric else mask3
            view_masks[row] = (moved[..., 0] >= 128).astype(np.uint8)
            row += 1
    return views, view_masks, shot_index


def with_labelled_defects(
    validation: PseudoAnomalySet,
    defect_images: np.ndarray | None,
    defect_masks: np.ndarray | None,
    config: SupportAugmentationConfig,
) -> PseudoAnomalySet:
    """The synthetic validation set plus augmented views of the labelled defect shots.

    As in the anomalous-samples seed, real defects (when a few are labelled) make the
    validation used for fusion weights and the threshold less synthetic. A view whose mask is
    unknown (no ground truth) or became empty keeps label 1 with ``mask_known`` False.
    """
    if defect_images is None or len(defect_images) == 0:
        return validation
    views, view_masks, shot_index = augment_labelled_defects(defect_images, defect_masks, config)
    count = len(views)
    names = augmentation_names(config, square=views.shape[1] == views.shape[2])
    masks = np.zeros(views.shape[:3], dtype=np.uint8) if view_masks is None else view_masks
    known = masks.reshape(count, -1).max(axis=1) > 0
    masks[~known] = 0
    extra = PseudoAnomalySet(
        normals=views.copy(),  # no clean counterpart exists for a real defect
        images=views,
        masks=masks,
        labels=np.ones(count, dtype=np.int64),
        source_index=np.full(count, -1, dtype=np.int64),
        defect_shot=shot_index,
        mask_known=known,
        view=np.tile(np.asarray(names, dtype=str), len(defect_images)),
    )
    return validation.concat(extra)


def views_of_good_images(images: np.ndarray, config: SupportAugmentationConfig, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The ``names`` views (other than the original) of good images (n, H, W, 3), as the labelled
    defects' views were made (:func:`augment_labelled_defects`): ``(views (m, H, W, 3), view names (m,))``,
    image-major. They are the negatives a defect view is compared with in the fusion's validation."""
    images = np.asarray(images)
    square = images.shape[1] == images.shape[2]
    wanted = set(names) - {ORIGINAL_VIEW}
    transforms = [(name, transform) for name, transform, _ in _transforms(config, square) if name in wanted]
    if not len(images) or not transforms:
        return np.zeros((0, *images.shape[1:]), np.uint8), np.zeros(0, dtype=str)
    views = np.stack([transform(image) for image in images for _, transform in transforms])
    return views, np.tile(np.asarray([name for name, _ in transforms], dtype=str), len(images))
