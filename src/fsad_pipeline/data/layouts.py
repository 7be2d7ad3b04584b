"""Dataset layouts: where the images of a category live and what each one is.

Three sources, all turned into the same list of :class:`ImageRecord`:

* ``mvtec``   ``<root>/<category>/{train/good, test/<good|defect_type>,
  ground_truth/<defect_type>/<stem>_mask.png}`` (``<stem>.png`` masks, VisA style, also accepted);
* ``folder``  a factory drop ``<root>/<category>/good/…``, ``defect/<type>/…`` and optional
  ``masks/<type>/<stem>.<ext>``; it has no train/test split, so the good images are split
  deterministically (``train_good_fraction``, ``split_seed``) into the support pool and test goods;
* ``textile`` the conformal-clip-data simulated textile images, materialised into the MVTec
  layout by :func:`materialise_textile` with a fixed split (see its docstring).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fsad_pipeline.data.images import IMAGE_SUFFIXES, list_images

logger = logging.getLogger(__name__)

NORMAL = "good"
SOURCES = ("mvtec", "folder", "textile")
MVTEC_MASK_FOLDER = "ground_truth"
FOLDER_DROP_MASK_FOLDER = "masks"
#: Folders that hold annotation masks in the layouts above, never images to inspect.
ANNOTATION_FOLDERS = (MVTEC_MASK_FOLDER, FOLDER_DROP_MASK_FOLDER)


class LayoutError(FileNotFoundError):
    """The category folder is missing, empty or not in the expected layout."""


@dataclass(frozen=True)
class ImageRecord:
    path: str
    split: str  # "train" (support pool) or "test"
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images
    mask_path: str  # "" when there is no mask
    masks_expected: bool = False  # the layout ships masks for this defect image's category

    def to_dict(self) -> dict:
        return asdict(self)


def _category_dir(root: str | Path, category: str) -> Path:
    if not category:
        raise LayoutError("data.category is empty: name the category folder to read")
    root = Path(root)
    folder = root / category
    if folder.is_dir():
        return folder
    if not root.is_dir():
        raise LayoutError(f"category folder {folder} does not exist ({root} does not exist)")
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise LayoutError(f"category folder {folder} does not exist (found: {', '.join(available) or 'nothing'})")


def _find_mask(mask_dir: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for name_suffix in suffixes:
        for ext in IMAGE_SUFFIXES:
            for candidate in (mask_dir / f"{stem}{name_suffix}{ext}", mask_dir / f"{stem}{name_suffix}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def discover_mvtec(root: str | Path, category: str) -> list[ImageRecord]:
    """Records of an MVTec-AD-layout category."""
    folder = _category_dir(root, category)
    train_good = list_images(folder / "train" / NORMAL)
    if not train_good:
        raise LayoutError(f"{folder / 'train' / NORMAL} holds no images: an MVTec-layout category needs train/good")
    records = [ImageRecord(str(p), "train", 0, NORMAL, "") for p in train_good]
    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise LayoutError(f"{test_dir} does not exist: an MVTec-layout category needs test/<good|defect_type>")
    ground_truth = folder / MVTEC_MASK_FOLDER
    has_masks = ground_truth.is_dir()
    if not has_masks:
        logger.info("%s has no ground_truth folder: pixel metrics will be skipped", folder)
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect_type = type_dir.name
        for image in list_images(type_dir):
            if defect_type == NORMAL:
                records.append(ImageRecord(str(image), "test", 0, NORMAL, ""))
                continue
            mask = _find_mask(ground_truth / defect_type, image.stem, ("_mask", "")) if has_masks else None
            records.append(ImageRecord(str(image), "test", 1, defect_type, str(mask) if mask else "", has_masks))
    if not any(r.split == "test" for r in records):
        raise LayoutError(f"{test_dir} holds no images")
    return records


def discover_folder(
    root: str | Path, category: str, *, train_good_fraction: float = 0.5, split_seed: int = 0
) -> list[ImageRecord]:
    """Records of a factory drop; good images are split into support pool and test goods."""
    folder = _category_dir(root, category)
    goods = list_images(folder / NORMAL)
    if not goods:
        raise LayoutError(f"{folder / NORMAL} holds no images: a folder drop needs <category>/good/")
    if not 0.0 < train_good_fraction < 1.0:
        raise ValueError(f"train_good_fraction must be in (0, 1), got {train_good_fraction}")
    order = np.random.default_rng(split_seed).permutation(len(goods))
    n_train = max(1, int(round(len(goods) * train_good_fraction)))
    train_idx = set(order[:n_train].tolist())
    records = [
        ImageRecord(str(p), "train" if i in train_idx else "test", 0, NORMAL, "") for i, p in enumerate(goods)
    ]
    defect_root = folder / "defect"
    masks_root = folder / FOLDER_DROP_MASK_FOLDER
    if defect_root.is_dir():
        for type_dir in sorted(p for p in defect_root.iterdir() if p.is_dir()):
            masks_expected = (masks_root / type_dir.name).is_dir()
            for image in list_images(type_dir):
                mask = _find_mask(masks_root / type_dir.name, image.stem, ("", "_mask")) if masks_expected else None
                records.append(
                    ImageRecord(str(image), "test", 1, type_dir.name, str(mask) if mask else "", masks_expected)
                )
    else:
        logger.warning("%s has no defect/ folder: only normal test images will be scored", folder)
    return records


def _textile_package_dir() -> Path:
    try:
        import conformal_clip_data
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise LayoutError(
            "the default textile data needs the conformal-clip-data package: pip install conformal-clip-data"
        ) from exc
    return Path(conformal_clip_data.__file__).parent / "data" / "textile_images" / "simulated"


def materialise_textile(
    root: str | Path,
    category: str = "textile",
    *,
    n_train_good: int = 200,
    n_test_good: int = 200,
    n_test_per_defect: int = 100,
    part: int = 0,
    source_dir: str | Path | None = None,
) -> Path:
    """Copy the conformal-clip-data textile images into the MVTec layout under ``root/category``.

    The split is fixed: files of each class are sorted by name; ``nominal`` files
    ``[0, n_train_good)`` go to ``train/good`` (the support pool), the next ``n_test_good`` to
    ``test/good``; the first ``n_test_per_defect`` of ``global`` and of ``local`` go to
    ``test/global`` and ``test/local``. The package ships no masks, so pixel metrics are skipped.
    ``part`` > 0 takes the next disjoint block of every class instead (nominal files from
    ``part * (n_train_good + n_test_good)``, defects from ``part * n_test_per_defect``): the
    pseudo-categories of the fleet pipeline, so several "product lines" share no image.
    Re-running is cheap: files already present with the same size are not copied again.
    """
    source = Path(source_dir) if source_dir else _textile_package_dir()
    classes = {name: list_images(source / name) for name in ("nominal", "global", "local")}
    for name, files in classes.items():
        if not files:
            raise LayoutError(f"textile source {source / name} holds no images")
    if part < 0:
        raise ValueError(f"textile part must be >= 0, got {part}")
    nominal_start = part * (n_train_good + n_test_good)
    defect_start = part * n_test_per_defect
    if nominal_start + n_train_good + n_test_good > len(classes["nominal"]):
        raise ValueError(
            f"textile split (part {part}) asks for nominal images {nominal_start}..."
            f"{nominal_start + n_train_good + n_test_good - 1}, the package has {len(classes['nominal'])}"
        )
    for name in ("global", "local"):
        if defect_start + n_test_per_defect > len(classes[name]):
            raise ValueError(
                f"textile split (part {part}) asks for {name} images {defect_start}..."
                f"{defect_start + n_test_per_defect - 1}, the package has {len(classes[name])}"
            )
    train_end = nominal_start + n_train_good
    plan = {
        Path("train") / NORMAL: classes["nominal"][nominal_start:train_end],
        Path("test") / NORMAL: classes["nominal"][train_end : train_end + n_test_good],
        Path("test") / "global": classes["global"][defect_start : defect_start + n_test_per_defect],
        Path("test") / "local": classes["local"][defect_start : defect_start + n_test_per_defect],
    }
    target_root = Path(root) / category
    for sub, files in plan.items():
        target = target_root / sub
        target.mkdir(parents=True, exist_ok=True)
        wanted = {f.name for f in files}
        for stale in target.iterdir():  # a changed split must not leave old files behind
            if stale.is_file() and stale.name not in wanted:
                stale.unlink()
        for file in files:
            destination = target / file.name
            if not destination.exists() or destination.stat().st_size != file.stat().st_size:
                shutil.copyfile(file, destination)
    return target_root


def list_categories(source: str, root: str | Path) -> list[str]:
    """The category folders under ``root`` that hold a ``source`` layout, sorted by name.

    ``mvtec``: folders with ``train/good``; ``folder``: folders with ``good/``. Hidden folders are
    skipped. The textile source has no folders to list (its images come from a package).
    """
    if source not in ("mvtec", "folder"):
        raise ValueError(f"categories can be listed for the mvtec and folder sources, not {source!r}")
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"data.root {root} does not exist: no categories to list")
    marker = Path("train") / NORMAL if source == "mvtec" else Path(NORMAL)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / marker).is_dir())
    if not found:
        seen = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise LayoutError(
            f"no {source}-layout category under {root} (a category folder holds {marker}/; "
            f"found: {', '.join(seen) or 'nothing'})"
        )
    return found


def discover(source: str, root: str | Path, category: str, **options) -> list[ImageRecord]:
    """Dispatch on ``data.source``; ``options`` are that source's own parameters."""
    if source == "mvtec":
        return discover_mvtec(root, category)
    if source == "folder":
        return discover_folder(root, category, **options)
    if source == "textile":
        materialise_textile(root, category, **options)
        return discover_mvtec(root, category)
    raise ValueError(f"unknown data.source {source!r}; choose one of {', '.join(SOURCES)}")
