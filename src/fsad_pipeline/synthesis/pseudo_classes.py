"""Pseudo defect *classes* for pretraining the defect-type classifier (methods.md §3, §12).

Every texture source of a :class:`~fsad_pipeline.synthesis.textures.TextureBank` is one class
(one DTD category per class folder, or one skimage / GIMP / procedural source of the built-in
bank). A sample pastes a texture of its class onto a support normal inside a Perlin-shaped or
blob mask and blends it as DRAEM does. Unlike the DFD pseudo-anomalies the texture is pasted
*raw* (no random colour/geometry augmenter) so that the class identity survives, the noise is
not rotated, the Perlin threshold is 0.35 and masks are rejection-sampled until their area
fraction lies in (0.10, 0.40), as in the multi-class reference. Each sample remembers its
source normal so the pretraining residual can be taken against the clean source image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from tqdm.auto import tqdm

from .anomalies import blend_anomaly
from .perlin import perlin_mask
from .textures import TextureBank

logger = logging.getLogger(__name__)

MASK_KINDS = ("perlin", "blob")
DEFAULT_AREA_RANGE = (0.10, 0.40)
DEFAULT_PERLIN_THRESHOLD = 0.35
DEFAULT_BETA_RANGE = (0.0, 0.8)


def blob_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    n_blobs_range: tuple[int, int] = (1, 4),
    axis_fraction_range: tuple[float, float] = (0.08, 0.35),
    edge_jitter: float = 0.25,
) -> np.ndarray:
    """A union of random rotated ellipses with ragged edges (uint8 {0, 1} of ``shape``).

    Ellipse semi-axes are drawn as fractions of the shorter side; the edge is roughened by
    thresholding a blurred noise field added to the smoothed ellipse mask, so blobs look like
    stains or holes rather than perfect discs. No area control here (see :func:`draw_mask`).
    """
    height, width = int(shape[0]), int(shape[1])
    canvas = np.zeros((height, width), dtype=np.uint8)
    short = min(height, width)
    for _ in range(int(rng.integers(n_blobs_range[0], n_blobs_range[1] + 1))):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = tuple(max(1, int(rng.uniform(*axis_fraction_range) * short)) for _ in range(2))
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0.0, 180.0)), 0.0, 360.0, 1, -1)
    if edge_jitter <= 0.0:
        return canvas
    kernel = max(3, (short // 16) | 1)
    smooth = cv2.GaussianBlur(canvas.astype(np.float32), (kernel, kernel), 0)
    noise = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (kernel, kernel), 0)
    noise /= float(np.abs(noise).max()) or 1.0
    return ((smooth + edge_jitter * noise) > 0.5).astype(np.uint8)


def draw_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    kind: str = "perlin",
    area_range: tuple[float, float] = DEFAULT_AREA_RANGE,
    perlin_threshold: float = DEFAULT_PERLIN_THRESHOLD,
    perlin_scale_exps: tuple[int, int] = (0, 5),
    foreground: np.ndarray | None = None,
    max_tries: int = 200,
) -> np.ndarray:
    """A Perlin or blob mask whose area fraction lies in the open interval ``area_range``.

    The fraction is measured inside ``foreground`` when one is given (the mask is cut to it),
    else over the whole image. Draws are rejected until the fraction fits; when ``max_tries``
    draws all miss, the draw closest to the interval is returned (logged) rather than failing.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
    low, high = area_range
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"area_range must satisfy 0 <= low < high <= 1, got {area_range}")
    region = None if foreground is None else (np.asarray(foreground) > 0)
    region_area = float(region.sum()) if region is not None else float(shape[0] * shape[1])
    if region_area == 0.0:
        raise ValueError("the foreground mask is empty: nowhere to paste a pseudo defect")
    best, best_gap = None, np.inf
    for _ in range(max(1, int(max_tries))):
        if kind == "perlin":
            mask = perlin_mask(
                shape, rng, min_scale_exp=perlin_scale_exps[0], max_scale_exp=perlin_scale_exps[1],
                threshold=perlin_threshold, rotation_range=None, area_range=None,
            )
        else:
            mask = blob_mask(shape, rng)
        if region is not None:
            mask = mask & region.astype(np.uint8)
        fraction = float(mask.sum()) / region_area
        if low < fraction < high:
            return mask
        gap = low - fraction if fraction <= low else fraction - high
        if gap < best_gap and mask.any():
            best, best_gap = mask, gap
    logger.debug("no %s mask with area in %s after %d tries; using the closest draw", kind, area_range, max_tries)
    return best if best is not None else mask


@dataclass
class PseudoClassSet:
    """Synthetic defects labelled by texture class; ``source_index`` names the clean normal."""

    images: np.ndarray  # (M, H, W, 3) uint8
    masks: np.ndarray  # (M, H, W) uint8 {0, 1}
    labels: np.ndarray  # (M,) int64, index into class_names
    source_index: np.ndarray  # (M,) int64, row of the support image the sample was pasted on
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def validate(self) -> PseudoClassSet:
        """Raise ValueError unless shapes, dtypes and label ranges are consistent; returns self."""
        count = len(self)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError("images must be (M, H, W, 3) uint8")
        if self.masks.shape != self.images.shape[:3] or self.masks.dtype != np.uint8:
            raise ValueError("masks must be (M, H, W) uint8 matching the images")
        for name in ("labels", "source_index"):
            array = getattr(self, name)
            if array.dtype != np.int64 or array.shape != (count,):
                raise ValueError(f"{name} must be ({count},) int64")
        if self.images.shape[0] != count:
            raise ValueError("images and labels differ in length")
        if count and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError("labels must index class_names")
        return self


def build_pseudo_class_set(
    support_images: Sequence[np.ndarray] | np.ndarray,
    textures: TextureBank,
    rng: np.random.Generator,
    *,
    samples_per_class: int = 30,
    mask_kinds: Sequence[str] = MASK_KINDS,
    beta_range: tuple[float, float] = DEFAULT_BETA_RANGE,
    area_range: tuple[float, float] = DEFAULT_AREA_RANGE,
    perlin_threshold: float = DEFAULT_PERLIN_THRESHOLD,
    foreground_masks: Sequence[np.ndarray] | np.ndarray | None = None,
    progress: bool = True,
) -> PseudoClassSet:
    """``samples_per_class`` synthetic defects for every texture class of ``textures``.

    Sample ``j`` of a class is pasted on support image ``j mod k`` (every class sees every
    normal equally often, so the source is not a shortcut to the class), with a mask kind
    drawn from ``mask_kinds``, the class's raw texture, and β ~ U(``beta_range``) in
    ``I·(1−M) + (1−β)·T·M + β·I·M``. Masks are cut to the image's foreground when
    ``foreground_masks`` are given (an empty one is ignored, with a warning). Deterministic for a
    given ``rng`` state.
    """
    support = [np.asarray(image) for image in support_images]
    if not support:
        raise ValueError("need at least one support image")
    shapes = {image.shape for image in support}
    if len(shapes) != 1:
        raise ValueError(f"all support images must share one size, got {sorted(shapes)}")
    (shape,) = shapes
    if len(shape) != 3 or shape[2] != 3 or support[0].dtype != np.uint8:
        raise ValueError(f"support images must be uint8 H×W×3 RGB, got {support[0].dtype} {shape}")
    if foreground_masks is not None and len(foreground_masks) != len(support):
        raise ValueError(f"{len(foreground_masks)} foreground masks for {len(support)} support images")
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
    kinds = tuple(mask_kinds)
    if not kinds or any(kind not in MASK_KINDS for kind in kinds):
        raise ValueError(f"mask_kinds must be a non-empty subset of {MASK_KINDS}, got {kinds}")

    if foreground_masks is not None:
        foregrounds: list[np.ndarray | None] = []
        for index, mask in enumerate(foreground_masks):
            if not np.asarray(mask).any():
                logger.warning("support image %d has an empty foreground mask: pseudo defects may land anywhere on it", index)
            foregrounds.append(np.asarray(mask) if np.asarray(mask).any() else None)
    names = textures.class_names
    total = len(names) * int(samples_per_class)
    height, width = shape[:2]
    images = np.empty((total, *shape), dtype=np.uint8)
    masks = np.empty((total, height, width), dtype=np.uint8)
    labels = np.repeat(np.arange(len(names), dtype=np.int64), int(samples_per_class))
    source_index = np.tile(np.arange(samples_per_class, dtype=np.int64) % len(support), len(names))
    for row in tqdm(range(total), desc="pseudo defect classes", disable=not progress):
        source = int(source_index[row])
        foreground = None if foreground_masks is None else foregrounds[source]
        kind = kinds[int(rng.integers(0, len(kinds)))]
        mask = draw_mask(
            (height, width), rng, kind=kind, area_range=area_range,
            perlin_threshold=perlin_threshold, foreground=foreground,
        )
        texture = textures.sample_class(names[int(labels[row])], rng, (height, width))
        beta = float(rng.uniform(*beta_range))
        blended = blend_anomaly(support[source], texture, mask, beta)
        images[row] = np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
        masks[row] = mask
    return PseudoClassSet(images, masks, labels, source_index, list(names)).validate()


__all__ = ["MASK_KINDS", "PseudoClassSet", "blob_mask", "build_pseudo_class_set", "draw_mask"]
