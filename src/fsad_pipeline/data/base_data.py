"""Base categories for category-agnostic encoder training, with the leave-one-category-out split.

Base data is every category found under the configured roots (MVTec layout, factory folder
drops, the textile data), discovered with :mod:`fsad_pipeline.data.layouts`. Only the support
pool of each category is used — ``train/good`` for the MVTec layout, the training share of the
good images for a folder drop — never a test image of any category. The target category (the
one to be inspected later with a few support images) is left out entirely, by name and by
folder, so no image of it reaches training or checkpoint selection.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fsad_pipeline.data.images import list_images
from fsad_pipeline.data.layouts import NORMAL, LayoutError, discover

logger = logging.getLogger(__name__)


def _candidate_categories(source: str, root: Path) -> list[str]:
    """Category folders under ``root`` that look like ``source``'s layout."""
    if not root.is_dir():
        raise LayoutError(f"base-data root {root} does not exist")
    marker = Path("train") / NORMAL if source == "mvtec" else Path(NORMAL)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / marker).is_dir())


def _support_pool(source: str, root: Path, category: str, options: Mapping[str, Any]) -> list[str]:
    """Good training images of one category (its support pool), sorted."""
    try:
        records = discover(source, root, category, **dict(options))
    except LayoutError as error:
        folder = root / category / "train" / NORMAL
        if source != "mvtec" or not list_images(folder):
            raise
        # A base category needs no test split: train/good alone is enough here.
        logger.info("%s: %s; using its train/good only", category, error)
        return sorted(str(p) for p in list_images(folder))
    return sorted(r.path for r in records if r.split == "train" and r.label == 0)


def discover_base_categories(
    sources: Sequence[Mapping[str, Any]],
    *,
    exclude: Sequence[str] = (),
    exclude_dirs: Sequence[str | Path] = (),
) -> dict[str, list[str]]:
    """``{category: [good training image paths]}`` over every source, minus the excluded ones.

    Each source is a mapping ``{source: mvtec|folder|textile, root: <dir>, categories: [..] or
    null (all found), options: {...} (that layout's own options)}``. A category name seen under
    two roots gets ``@<root folder name>`` appended. ``exclude`` names and ``exclude_dirs``
    folders are left out (the leave-one-out target).
    """
    excluded_names = {str(name) for name in exclude if name}
    excluded_dirs = {Path(d).resolve() for d in exclude_dirs}
    categories: dict[str, list[str]] = {}
    for entry in sources:
        source = str(entry.get("source", "mvtec"))
        root = Path(entry["root"])
        options = entry.get("options") or {}
        names = list(entry.get("categories") or ([] if source == "textile" else _candidate_categories(source, root)))
        if source == "textile" and not names:
            names = ["textile"]
        for name in names:
            if name in excluded_names or (root / name).resolve() in excluded_dirs:
                logger.info("base data: %s left out (target)", root / name)
                continue
            paths = _support_pool(source, root, name, options)
            if not paths:
                logger.warning("base data: %s has no good training images; skipped", root / name)
                continue
            key = name if name not in categories else f"{name}@{root.resolve().name}"
            categories[key] = paths
    if not categories:
        raise LayoutError(f"no base category found in {[str(s.get('root')) for s in sources]} (after leaving out {sorted(excluded_names)})")
    return categories


def split_base_categories(
    categories: Mapping[str, Sequence[str]],
    *,
    images_per_category: int | None,
    validation_per_category: int,
    seed: int,
) -> dict[str, dict[str, list[str]]]:
    """Per category, a seeded draw of training images and held-back validation images (disjoint).

    The validation images are drawn first (at most a third of the pool, and at least one image
    stays for training); then up to ``images_per_category`` training images from the rest.
    """
    split: dict[str, dict[str, list[str]]] = {}
    for index, (name, paths) in enumerate(sorted(categories.items())):
        pool = sorted(paths)
        order = np.random.default_rng([int(seed), 104729, index]).permutation(len(pool))
        n_val = min(int(validation_per_category), len(pool) // 3)
        validation = sorted(pool[i] for i in order[:n_val])
        rest = [pool[i] for i in order[n_val:]]
        if images_per_category is not None:
            rest = rest[: int(images_per_category)]
        split[name] = {"train": sorted(rest), "validation": validation}
    return split


def leave_one_out_split(
    sources: Sequence[Mapping[str, Any]],
    *,
    target: str | None,
    target_dir: str | Path | None = None,
    images_per_category: int | None = None,
    validation_per_category: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """The base split for one target category, JSON-ready.

    ``{target, categories: {name: {train: [...], validation: [...]}}}``; the target (by name and,
    when given, by folder) contributes no image at all.
    """
    categories = discover_base_categories(
        sources, exclude=[target] if target else [], exclude_dirs=[target_dir] if target_dir else []
    )
    split = split_base_categories(
        categories,
        images_per_category=images_per_category,
        validation_per_category=validation_per_category,
        seed=seed,
    )
    for name, parts in split.items():
        logger.info("base category %s: %d training, %d validation images", name, len(parts["train"]), len(parts["validation"]))
    return {"target": target, "target_dir": str(target_dir) if target_dir else None, "seed": int(seed), "categories": split}


__all__: list[str] = ["discover_base_categories", "leave_one_out_split", "split_base_categories"]
