"""Seeded k-shot support selection and loading of the selected images."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from fsad_pipeline.data.geometry import as_hw
from fsad_pipeline.data.images import read_image, resize_image

logger = logging.getLogger(__name__)


def support_pool(manifest: pd.DataFrame) -> list[str]:
    """Paths of the good training images, sorted (the pool the support shots come from)."""
    pool = manifest[(manifest["split"] == "train") & (manifest["label"] == 0)]
    return sorted(pool["path"].tolist())


def check_support_pool(manifest: pd.DataFrame, k_shot: int, *, rejected: int = 0) -> list[str]:
    """The support pool (:func:`support_pool`), or a ValueError when it cannot give ``k_shot`` images.

    The ingestion checks this before it saves anything, so a failed run never leaves a manifest
    that describes another drop than the support selection beside it. ``rejected`` (files the
    manifest refused) is named in the message, as it is often why the pool is short.
    """
    if k_shot < 1:
        raise ValueError(f"k_shot must be at least 1, got {k_shot}")
    pool = support_pool(manifest)
    if k_shot > len(pool):
        extra = f" ({rejected} file(s) were rejected as unreadable; see the ingestion log)" if rejected else ""
        raise ValueError(
            f"k_shot={k_shot} but only {len(pool)} good training image(s) are available{extra}; "
            "lower k_shot or add good images"
        )
    return pool


def select_support(manifest: pd.DataFrame, *, k_shot: int, seed: int, rounds: int = 1) -> dict:
    """Draw ``rounds`` independent k-shot support sets from the good training images.

    Round ``r`` uses ``np.random.default_rng([seed, r])``, so adding rounds never changes the
    earlier ones. Returns a JSON-ready dict ``{k_shot, seed, pool_size, rounds: [[path, ...], ...]}``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    pool = check_support_pool(manifest, k_shot)
    selections = []
    for round_index in range(rounds):
        rng = np.random.default_rng([seed, round_index])
        chosen = rng.choice(len(pool), size=k_shot, replace=False)
        selections.append([pool[i] for i in sorted(chosen.tolist())])
    return {"k_shot": int(k_shot), "seed": int(seed), "pool_size": len(pool), "rounds": selections}


def unseen_good_paths(
    manifest: pd.DataFrame, support_selection: dict, *, calibration: int, fusion: int = 0, seed: int
) -> tuple[list[str], list[str]]:
    """Good images of the support pool that are no support of any round (the model is never
    fitted on them; never test images), as two disjoint seeded draws, each sorted: up to
    ``calibration`` to calibrate the decision threshold and up to ``fusion`` as the fusion's
    unseen normals. The fusion takes at most a third of them, so that a small pool keeps most
    of its images for the threshold."""
    supports = {path for paths in support_selection.get("rounds", []) for path in paths}
    rest = [path for path in support_pool(manifest) if path not in supports]
    order = np.random.default_rng([int(seed), 104729]).permutation(len(rest))
    n_fusion = min(max(int(fusion), 0), len(rest) // 3)
    chosen_fusion = sorted(rest[i] for i in order[:n_fusion])
    chosen_calibration = sorted(rest[i] for i in order[n_fusion : n_fusion + max(int(calibration), 0)])
    return chosen_calibration, chosen_fusion


def evaluation_set(manifest: pd.DataFrame, exclude: Sequence[str] = ()) -> pd.DataFrame:
    """The test rows of the manifest, minus any path in ``exclude`` (e.g. labelled defect shots)."""
    excluded = set(exclude)
    test = manifest[(manifest["split"] == "test") & ~manifest["path"].isin(excluded)]
    return test.sort_values("path").reset_index(drop=True)


def load_images(paths: Sequence[str], image_size: int | tuple[int, int], *, max_pixels: int | None = None) -> np.ndarray:
    """Read and resize images into one (N, H, W, 3) uint8 array."""
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    images = [resize_image(read_image(path, **kwargs), image_size) for path in paths]
    if not images:
        return np.zeros((0, *as_hw(image_size), 3), dtype=np.uint8)
    return np.stack(images)


def load_gt_masks(
    mask_paths: Sequence[str], labels: Sequence[int], image_size: int | tuple[int, int], *, threshold: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth masks at ``image_size`` (nearest), all-zero for normal images.

    Returns ``(masks (N, H, W) uint8, has_mask (N,) bool)``; ``has_mask`` is False for a defect
    image without a mask, so pixel metrics can leave it out instead of counting it as all-normal.
    """
    from fsad_pipeline.data.images import read_mask, resize_mask

    height, width = as_hw(image_size)
    masks = np.zeros((len(mask_paths), height, width), dtype=np.uint8)
    has_mask = np.zeros(len(mask_paths), dtype=bool)
    for index, (path, label) in enumerate(zip(mask_paths, labels)):
        if int(label) == 0:
            has_mask[index] = True
        elif path:
            masks[index] = resize_mask(read_mask(path, threshold=threshold), (height, width))
            has_mask[index] = True
    return masks, has_mask


#: The long-side cap of pixel metrics when no ``evaluation.pixel_max_side`` is at hand (its default).
DEFAULT_PIXEL_MAX_SIDE = 1024


def load_native_gt_masks(
    image_paths: Sequence[str],
    mask_paths: Sequence[str],
    labels: Sequence[int],
    *,
    max_side: int | None = None,
    threshold: int = 0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Ground-truth masks at each image's own size (long side capped at ``max_side``, aspect kept).

    Like :func:`load_gt_masks` but for pixel metrics at the original resolution: a list of
    (H_i, W_i) uint8 masks, all-zero for normal images (sized from the image's header, no decode),
    and ``has_mask`` (False for a defect image without a mask).
    """
    from fsad_pipeline.data.geometry import capped_size, read_image_sizes
    from fsad_pipeline.data.images import read_mask, resize_mask

    masks: list[np.ndarray] = []
    has_mask = np.zeros(len(image_paths), dtype=bool)
    for index, (image_path, mask_path, label) in enumerate(zip(image_paths, mask_paths, labels, strict=True)):
        size = capped_size(*read_image_sizes([image_path])[0], max_side)
        mask = np.zeros(size, dtype=np.uint8)
        if int(label) == 0:
            has_mask[index] = True
        elif mask_path:
            mask = resize_mask(read_mask(mask_path, threshold=threshold), size)
            has_mask[index] = True
        masks.append(mask)
    return masks, has_mask


def select_defect_shots(manifest: pd.DataFrame, *, k_defect_shots: int, seed: int) -> dict:
    """Up to ``k_defect_shots`` labelled defect images per defect type, taken from the test set.

    These images teach the anomalous memory bank (and the defect-type classifier); they are
    removed from every evaluation (see :func:`evaluation_set`). Returns
    ``{"k_defect_shots": k, "seed": seed, "shots": {defect_type: [path, ...]}}``.
    """
    if k_defect_shots < 0:
        raise ValueError(f"k_defect_shots must be >= 0, got {k_defect_shots}")
    shots: dict[str, list[str]] = {}
    if k_defect_shots > 0:
        defects = manifest[(manifest["split"] == "test") & (manifest["label"] == 1)]
        for defect_type in sorted(defects["defect_type"].unique()):
            paths = sorted(defects.loc[defects["defect_type"] == defect_type, "path"])
            # Keep at least one image of the type for evaluation.
            take = min(k_defect_shots, max(0, len(paths) - 1))
            if take < k_defect_shots:
                logger.warning(
                    "defect type %r has %d image(s): %d taken as labelled shot(s) instead of k_defect_shots=%d "
                    "(one is always kept for evaluation)", defect_type, len(paths), take, k_defect_shots,
                )
            rng = np.random.default_rng([seed, 7919, len(shots)])
            shots[str(defect_type)] = sorted(paths[i] for i in rng.choice(len(paths), size=take, replace=False))
    return {"k_defect_shots": int(k_defect_shots), "seed": int(seed), "shots": shots}


def defect_shot_paths(defect_shots: dict) -> list[str]:
    return sorted(path for paths in defect_shots.get("shots", {}).values() for path in paths)


def load_defect_shots(
    manifest: pd.DataFrame, defect_shots: dict, image_size: int | tuple[int, int], *, mask_threshold: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labelled defect shots as ``(images (n, H, W, 3), masks (n, H, W), has_mask (n,))``, path order
    (mask pixels above ``mask_threshold``, ``data.mask_threshold``, are defect)."""
    paths = defect_shot_paths(defect_shots)
    if not paths:
        return load_images([], image_size), np.zeros((0, *as_hw(image_size)), np.uint8), np.zeros(0, bool)
    rows = manifest.set_index("path").loc[paths]
    images = load_images(paths, image_size)
    masks, has_mask = load_gt_masks(rows["mask_path"].tolist(), rows["label"].tolist(), image_size,
                                    threshold=mask_threshold)
    return images, masks, has_mask
