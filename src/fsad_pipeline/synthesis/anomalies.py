"""DFD pseudo-anomalies: Perlin-shaped texture pastes inside the foreground (methods.md §3).

The training split is the DFD recipe (rotated copies, Perlin texture pastes). The validation
split may instead draw each anomaly from a mix of defect *families* (thin scratches, speckles,
CutPaste, blotches, missing parts, Perlin pastes: :mod:`.defect_families`), recorded per row in
``PseudoAnomalySet.family`` so per-family metrics can be reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from .foreground import FOREGROUND_METHODS, foreground_mask
from .perlin import perlin_mask, rotate_about_center
from .textures import TextureBank, augment_texture

if TYPE_CHECKING:  # the family module imports this one (it reuses the Perlin paste)
    from .defect_families import FamilyConfig

#: ``PseudoAnomalySet.family`` of label-0 rows, of real labelled defect views, and of synthetic
#: anomalies of a set saved before families existed (the DFD Perlin paste).
NORMAL_FAMILY, REAL_FAMILY, DEFAULT_FAMILY = "normal", "real", "perlin"
#: ``view`` of a row shown as it was made (not turned, mirrored or recoloured afterwards).
ORIGINAL_VIEW = "original"


def blend_anomaly(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """I·(1−M) + (1−β)·T·M + β·I·M with I, T in [0, 1] (uint8 inputs are divided by 255)."""

    def to_unit(array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)

    img = to_unit(image)
    tex = to_unit(texture)
    m = np.asarray(mask, dtype=np.float32)
    if m.ndim == img.ndim - 1:
        m = m[..., None]
    return (img * (1.0 - m) + (1.0 - beta) * tex * m + beta * img * m).astype(np.float32)


def rotate_image(image: np.ndarray, angle_deg: float, *, border: int = cv2.BORDER_REFLECT_101) -> np.ndarray:
    """Rotate about the centre with a reflected border (the reference fills black corners)."""
    return rotate_about_center(image, angle_deg, interpolation=cv2.INTER_LINEAR, border=border)


@dataclass
class PseudoAnomaly:
    """One training sample: rotated clean image, its augmented version, mask and label."""

    normal: np.ndarray  # uint8 H×W×3, the rotated clean image
    image: np.ndarray  # uint8 H×W×3, the augmented image
    mask: np.ndarray  # uint8 H×W {0,1}
    label: int


def make_pseudo_anomaly(
    image: np.ndarray,
    rng: np.random.Generator,
    textures: TextureBank,
    *,
    foreground: str | np.ndarray = "auto",
    anomaly_probability: float = 0.8,
    beta_range: tuple[float, float] = (0.0, 0.8),
    rotation_range: tuple[float, float] = (-90.0, 90.0),
    perlin_kwargs: dict[str, Any] | None = None,
    augment_ops: int = 3,
    foreground_kwargs: dict[str, Any] | None = None,
) -> PseudoAnomaly:
    """DFD sample: rotate, foreground, (with ``anomaly_probability``) paste a Perlin-shaped texture.

    ``foreground`` is a method of ``FOREGROUND_METHODS`` applied to the rotated image, or a
    precomputed H×W mask of the unrotated image (rotated along with it, nearest neighbour).
    Defaults are DFD's MVTec values (p = 0.8, β ~ U[0, 0.8), rotation U(−90°, 90°)).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H×W×3 RGB image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    angle = rng.uniform(*rotation_range)
    normal = rotate_image(image, angle)

    if isinstance(foreground, str):
        if foreground not in FOREGROUND_METHODS:
            raise ValueError(f"unknown foreground {foreground!r}; choose one of {FOREGROUND_METHODS}")
        fg = foreground_mask(normal, foreground, **(foreground_kwargs or {}))
    else:
        fg = np.asarray(foreground, dtype=np.uint8)
        if fg.shape != (height, width):
            raise ValueError(f"foreground mask shape {fg.shape} != image shape {(height, width)}")
        fg = rotate_about_center(fg, angle, interpolation=cv2.INTER_NEAREST, border=cv2.BORDER_REFLECT_101)

    empty = np.zeros((height, width), dtype=np.uint8)
    if rng.random() >= anomaly_probability:
        return PseudoAnomaly(normal=normal, image=normal.copy(), mask=empty, label=0)

    augmented, mask = paste_texture_anomaly(
        normal, fg, rng, textures, beta_range=beta_range, perlin_kwargs=perlin_kwargs, augment_ops=augment_ops
    )
    if not mask.any():
        return PseudoAnomaly(normal=normal, image=normal.copy(), mask=empty, label=0)
    return PseudoAnomaly(normal=normal, image=augmented, mask=mask, label=1)


def paste_texture_anomaly(
    image: np.ndarray,
    foreground: np.ndarray,
    rng: np.random.Generator,
    textures: TextureBank,
    *,
    beta_range: tuple[float, float] = (0.0, 0.8),
    perlin_kwargs: dict[str, Any] | None = None,
    augment_ops: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """The DFD paste on an (already rotated) image: Perlin mask ∩ foreground, augmented texture, β blend.

    Returns ``(augmented uint8 H×W×3, mask uint8 {0, 1})``; the mask may be empty (the Perlin
    blobs missed the foreground), then the image is returned unchanged. The random draws
    (mask, texture, augmentation, β) happen in this order whatever the outcome, so the DFD
    training split is reproducible for a seed.
    """
    height, width = image.shape[:2]
    mask = perlin_mask((height, width), rng, **(perlin_kwargs or {})) & (np.asarray(foreground) > 0).astype(np.uint8)
    texture, _ = textures.sample(rng, (height, width))
    texture = augment_texture(texture, rng, n_ops=augment_ops)
    beta = rng.uniform(*beta_range)
    if not mask.any():
        return image.copy(), mask.astype(np.uint8)
    blended = blend_anomaly(image, texture, mask, beta)
    augmented = np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
    return augmented, mask.astype(np.uint8)


@dataclass
class PseudoAnomalySet:
    """Stacked validation/training samples; ``source_index`` names the support image each came from.

    Rows may also be augmented views of real labelled defect shots (the fusion validation set):
    those have ``source_index == -1``, ``defect_shot`` = the shot they come from (−1 for
    synthetic rows), and ``mask_known`` False when the shot has no ground-truth mask (their mask
    is then empty although the label is 1). Rows made from good images that are no support
    (:func:`build_unseen_validation_set`) have ``source_index == -1`` and ``defect_shot == -1``
    (:attr:`from_unseen`): nothing was fitted on them, so every scorer scores them as it
    scores a new image.

    ``family`` names how each row was made (a str array): ``"normal"`` for label 0, ``"real"``
    for labelled defect views, else the defect family (``"perlin"``, ``"scratch"``, ...). Left
    out, it is derived from the labels: synthetic anomalies are then the DFD ``"perlin"`` paste.
    ``view`` names the view of a labelled defect row (``"original"``, ``"rot90x2"``, ``"hflip"``,
    ...: :func:`~fsad_pipeline.synthesis.support_augmentation.augmentation_names`); every other
    row is ``"original"``.
    """

    normals: np.ndarray  # (M, H, W, 3) uint8
    images: np.ndarray  # (M, H, W, 3) uint8
    masks: np.ndarray  # (M, H, W) uint8
    labels: np.ndarray  # (M,) int64
    source_index: np.ndarray  # (M,) int64
    defect_shot: np.ndarray | None = None  # (M,) int64, −1 for synthetic rows
    mask_known: np.ndarray | None = None  # (M,) bool
    family: np.ndarray | None = None  # (M,) str
    view: np.ndarray | None = None  # (M,) str

    def __post_init__(self) -> None:
        count = int(np.asarray(self.labels).shape[0])
        if self.defect_shot is None:
            self.defect_shot = np.full(count, -1, dtype=np.int64)
        if self.mask_known is None:
            self.mask_known = np.ones(count, dtype=bool)
        if self.family is None:
            labels = np.asarray(self.labels)
            real = np.asarray(self.defect_shot) >= 0
            self.family = np.where(labels == 0, NORMAL_FAMILY, np.where(real, REAL_FAMILY, DEFAULT_FAMILY))
        self.family = np.asarray(self.family, dtype=str)
        self.view = np.full(count, ORIGINAL_VIEW) if self.view is None else np.asarray(self.view, dtype=str)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def from_unseen(self) -> np.ndarray:
        """(M,) bool: rows made from a good image that is no support (nor a labelled defect shot)."""
        return (np.asarray(self.source_index) < 0) & (np.asarray(self.defect_shot) < 0)

    def concat(self, other: PseudoAnomalySet) -> PseudoAnomalySet:
        """Rows of ``self`` followed by the rows of ``other``."""
        fields = ("normals", "images", "masks", "labels", "source_index", "defect_shot", "mask_known", "family", "view")
        return PseudoAnomalySet(
            **{name: np.concatenate([getattr(self, name), getattr(other, name)]) for name in fields}
        ).validate()

    def validate(self) -> PseudoAnomalySet:
        """Raise ValueError unless shapes and dtypes are consistent; returns self."""
        count = len(self)
        checks = {
            "normals": (self.normals, np.uint8, 4),
            "images": (self.images, np.uint8, 4),
            "masks": (self.masks, np.uint8, 3),
            "labels": (self.labels, np.int64, 1),
            "source_index": (self.source_index, np.int64, 1),
            "defect_shot": (self.defect_shot, np.int64, 1),
            "mask_known": (self.mask_known, np.bool_, 1),
        }
        for name, (array, dtype, ndim) in checks.items():
            if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != ndim:
                raise ValueError(f"{name} must be a {ndim}-D {np.dtype(dtype).name} array")
            if array.shape[0] != count:
                raise ValueError(f"{name} has {array.shape[0]} rows, expected {count}")
        if self.normals.shape[-1] != 3 or self.images.shape != self.normals.shape:
            raise ValueError("normals and images must both be (M, H, W, 3)")
        if self.masks.shape != self.normals.shape[:3]:
            raise ValueError("masks must be (M, H, W) matching the images")
        if self.masks.size and self.masks.max() > 1:
            raise ValueError("masks must hold values in {0, 1}")
        from_mask = self.masks.reshape(count, -1).max(axis=1, initial=0).astype(np.int64)
        if not np.array_equal(self.labels[self.mask_known], from_mask[self.mask_known]):
            raise ValueError("labels must be 1 exactly where the mask is non-empty")
        if (from_mask[~self.mask_known] != 0).any() or (self.labels[~self.mask_known] != 1).any():
            raise ValueError("rows without a known mask must be labelled defects with an empty mask")
        if not isinstance(self.family, np.ndarray) or self.family.dtype.kind != "U" or self.family.shape != (count,):
            raise ValueError(f"family must be a ({count},) str array")
        if not np.array_equal(self.family == NORMAL_FAMILY, self.labels == 0):
            raise ValueError(f"family must be {NORMAL_FAMILY!r} exactly on the label-0 rows")
        if not isinstance(self.view, np.ndarray) or self.view.dtype.kind != "U" or self.view.shape != (count,):
            raise ValueError(f"view must be a ({count},) str array")
        return self


def build_pseudo_anomaly_set(
    support_images: Sequence[np.ndarray],
    n_per_image: int,
    rng: np.random.Generator,
    textures: TextureBank,
    *,
    foreground_masks: Sequence[np.ndarray] | None = None,
    progress: bool = True,
    families: FamilyConfig | None = None,
    **make_kwargs: Any,
) -> PseudoAnomalySet:
    """``n_per_image`` pseudo-anomalies per support image (DFD precomputes 80 per shot).

    ``foreground_masks`` (one per support image) are computed once and rotated with each
    sample, instead of recomputing the foreground of every rotated copy.

    With ``families`` (a :class:`~fsad_pipeline.synthesis.defect_families.FamilyConfig`) each
    anomalous row (probability ``anomaly_probability``) draws its defect family by the config's
    weights, and nothing is rotated: every ``normals`` row, and every label-0 ``images`` row, is
    the support image itself (the memory-bank stage scores those leave-one-support-out). Only
    ``anomaly_probability``, ``foreground`` and ``foreground_kwargs`` apply then.
    """
    if len(support_images) == 0:
        raise ValueError("need at least one support image")
    if foreground_masks is not None and len(foreground_masks) != len(support_images):
        raise ValueError(f"{len(foreground_masks)} foreground masks for {len(support_images)} support images")
    shapes = {tuple(np.asarray(img).shape) for img in support_images}
    if len(shapes) != 1:
        raise ValueError(f"all support images must share one size, got {sorted(shapes)}")
    (shape,) = shapes
    if families is not None:
        return _build_family_set(
            support_images, int(n_per_image), rng, textures, families,
            foreground_masks=foreground_masks, progress=progress, **make_kwargs,
        )
    total = len(support_images) * int(n_per_image)
    normals = np.empty((total, *shape), dtype=np.uint8)
    images = np.empty((total, *shape), dtype=np.uint8)
    masks = np.empty((total, *shape[:2]), dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    source_index = np.repeat(np.arange(len(support_images), dtype=np.int64), int(n_per_image))
    with tqdm(total=total, desc="pseudo-anomalies", disable=not progress) as bar:
        for row, source in enumerate(source_index):
            if foreground_masks is not None:
                make_kwargs["foreground"] = foreground_masks[int(source)]
            sample = make_pseudo_anomaly(support_images[int(source)], rng, textures, **make_kwargs)
            normals[row], images[row], masks[row], labels[row] = sample.normal, sample.image, sample.mask, sample.label
            bar.update(1)
    return PseudoAnomalySet(normals, images, masks, labels, source_index).validate()


#: ``build_pseudo_anomaly_set`` keywords that still apply when the rows draw defect families.
_FAMILY_SET_KWARGS = ("anomaly_probability", "foreground", "foreground_kwargs")


def _build_family_set(
    support_images: Sequence[np.ndarray],
    n_per_image: int,
    rng: np.random.Generator,
    textures: TextureBank,
    families: FamilyConfig,
    *,
    foreground_masks: Sequence[np.ndarray] | None,
    progress: bool,
    anomaly_probability: float = 0.8,
    foreground: str = "auto",
    foreground_kwargs: dict[str, Any] | None = None,
    **unused: Any,
) -> PseudoAnomalySet:
    """The family-mixture set of :func:`build_pseudo_anomaly_set` (unrotated, one family per anomaly)."""
    if unused:
        raise ValueError(f"{sorted(unused)} do not apply with families (only {_FAMILY_SET_KWARGS} do)")
    support = np.stack([np.asarray(image) for image in support_images])
    if foreground_masks is None:
        foreground_masks = [foreground_mask(image, foreground, **(foreground_kwargs or {})) for image in support]
    total = len(support) * n_per_image
    source_index = np.repeat(np.arange(len(support), dtype=np.int64), n_per_image)
    normals = support[source_index]
    images = normals.copy()
    masks = np.zeros(normals.shape[:3], dtype=np.uint8)
    anomalous = rng.random(total) < anomaly_probability
    family = np.full(total, NORMAL_FAMILY, dtype=object)
    for row in tqdm(np.flatnonzero(anomalous), desc="pseudo-anomaly families", disable=not progress):
        source = int(source_index[row])
        images[row], masks[row], family[row] = families.draw(support[source], foreground_masks[source], rng, textures)
    return PseudoAnomalySet(
        normals, images, masks, anomalous.astype(np.int64), source_index, family=family.astype(str)
    ).validate()


def build_unseen_validation_set(
    images: np.ndarray,
    n_defects_per_image: int,
    rng: np.random.Generator,
    textures: TextureBank,
    families: FamilyConfig,
    *,
    foreground_masks: Sequence[np.ndarray] | None = None,
    foreground: str = "auto",
    progress: bool = True,
) -> PseudoAnomalySet:
    """A validation set made from good images no scorer is fitted on: each image once as it is
    (label 0) followed by ``n_defects_per_image`` defects drawn from ``families`` on it.

    Every row has ``source_index == -1`` (:attr:`PseudoAnomalySet.from_unseen`), so the scorers
    score the whole set as they score new images: no leave-one-support-out bank, no cross-fitted
    validator, and the validation normals are real good images, not copies of the supports.
    """
    images = np.asarray(images)
    if images.ndim != 4 or not len(images):
        raise ValueError("need at least one (H, W, 3) good image")
    if int(n_defects_per_image) < 1:
        raise ValueError(f"n_defects_per_image must be >= 1, got {n_defects_per_image}")
    defects = build_pseudo_anomaly_set(
        images, int(n_defects_per_image), rng, textures, foreground_masks=foreground_masks, progress=progress,
        families=families, anomaly_probability=1.0, foreground=foreground,
    )
    count = len(images)
    clean = PseudoAnomalySet(
        images.copy(), images.copy(), np.zeros(images.shape[:3], np.uint8), np.zeros(count, np.int64),
        np.full(count, -1, np.int64),
    )
    defects.source_index = np.full(len(defects), -1, np.int64)
    return clean.concat(defects)
