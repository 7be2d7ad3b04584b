"""Image geometry: the working size the models see, fitting images to it, and tiling.

One home for every size question of the project:

* :func:`as_hw` — ``image_size`` as ``(height, width)``: an int means a square (as saved by old
  models), a pair is taken as (H, W).
* :func:`check_size_multiple` — a CNN's deepest used stage halves the input several times; an
  input whose sides are not multiples of that stage's stride gives feature grids that do not line
  up between stages (and a DFD discriminator sized for one grid refuses the next image).
* :func:`resolve_working_size` — the working size of a dataset, resolved once from the support
  pool: ``squeeze`` resizes everything to ``image_size x image_size`` (the historical behaviour);
  ``keep_aspect`` keeps the short side at ``image_size`` and sets the long side from the median
  aspect ratio of the pool, rounded to the size multiple. Square data resolve to exactly
  ``(image_size, image_size)`` in both layouts.
* :func:`fit_to_size` — an image of another aspect than the working size (a new camera at
  inference) is resized keeping its aspect so it covers the working size, then centre-cropped.
* :func:`tile_image` / :func:`stitch_maps` — overlapping model-size tiles of a large image and
  the average of the tiles' maps back at the image's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

#: Layouts of :func:`resolve_working_size`.
LAYOUTS = ("keep_aspect", "squeeze")


def as_hw(image_size: int | Sequence[int] | Mapping) -> tuple[int, int]:
    """``image_size`` as ``(height, width)``: an int is a square, a pair is (H, W).

    The ingestion's working-size record (``{"image_size": [H, W], ...}``, see
    :func:`working_size_record`) is accepted too, so nodes take either the record or a size.
    """
    if isinstance(image_size, Mapping):
        image_size = image_size["image_size"]
    if isinstance(image_size, (int, np.integer)):
        return (int(image_size), int(image_size))
    values = list(image_size)
    if len(values) != 2:
        raise ValueError(f"image_size must be an int or [height, width], got {image_size!r}")
    return (int(values[0]), int(values[1]))


def image_size_matches(model_size: int | Sequence[int], configured: int | Sequence[int]) -> bool:
    """Whether a model fitted at ``model_size`` suits a configuration asking for ``configured``.

    A configured pair is an exact working size. A configured int is the short side: under
    ``keep_aspect`` the working size of non-square data is (short, long), so the model matches
    when its short side is that int (a square model of that side matches too, as before).
    """
    model_hw = as_hw(model_size)
    if isinstance(configured, (int, np.integer)):
        return min(model_hw) == int(configured)
    return model_hw == as_hw(configured)


def check_size_multiple(image_size: int | Sequence[int], multiple: int, *, what: str = "the backbone") -> tuple[int, int]:
    """Return ``as_hw(image_size)``, raising a clear error when a side is not a multiple of ``multiple``."""
    height, width = as_hw(image_size)
    if min(height, width) < 1:
        raise ValueError(f"image size {height}x{width} must be positive")
    if multiple > 1 and (height % multiple or width % multiple):
        raise ValueError(
            f"image size {height}x{width} (H x W) is not a multiple of {multiple}, the stride of the deepest "
            f"stage {what} uses: feature grids of its stages would not line up. Use sides that are "
            f"multiples of {multiple} (e.g. {_round_to(height, multiple)}x{_round_to(width, multiple)}), "
            "or set image_size_multiple accordingly"
        )
    return height, width


def _round_to(value: float, multiple: int) -> int:
    """Nearest positive multiple of ``multiple``."""
    return max(multiple, int(round(value / multiple)) * multiple)


def read_image_sizes(paths: Iterable[str | Path]) -> list[tuple[int, int]]:
    """``(height, width)`` of each image from its header only (PIL opens lazily: no decode).

    PIL's own pixel limit is off here: the guard is ``data.max_pixels``, applied by the reader."""
    from PIL import Image

    from fsad_pipeline.data.images import QUARTER_TURN_ORIENTATIONS, exif_orientation, pil_guard_off

    sizes = []
    for path in paths:
        with pil_guard_off(), Image.open(path) as image:
            width, height = image.size
            if exif_orientation(image) in QUARTER_TURN_ORIENTATIONS:  # as displayed (and as read)
                width, height = height, width
        sizes.append((int(height), int(width)))
    return sizes


def resolve_working_size(
    sizes: Sequence[tuple[int, int]],
    image_size: int | Sequence[int],
    *,
    layout: str = "keep_aspect",
    multiple: int = 16,
    max_upscale: float | None = None,
) -> tuple[int, int]:
    """The (H, W) every image of a dataset is resized to, from the pool's native ``sizes``.

    ``image_size`` given as [H, W] is used as is (an explicit working size). An int is the square
    side under ``squeeze`` and the short side under ``keep_aspect``, where the long side follows
    the median aspect (long / short) of ``sizes``, rounded to ``multiple`` and never below the
    short side, in the orientation most of the pool has. Square pools give ``(n, n)`` exactly.
    ``max_upscale`` (``keep_aspect`` only) caps the short side at that multiple of the pool's
    median native short side (rounded to ``multiple``): 1.0 never invents pixels, so a 128-px-wide
    image stays 128 px wide instead of being doubled.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"image_layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(image_size, (int, np.integer)):
        return check_size_multiple(image_size, multiple)
    short = int(image_size)
    check_size_multiple(short, multiple)
    if layout == "squeeze" or not sizes:
        return (short, short)
    heights = np.asarray([h for h, _ in sizes], dtype=np.float64)
    widths = np.asarray([w for _, w in sizes], dtype=np.float64)
    if max_upscale is not None:
        if not float(max_upscale) > 0:
            raise ValueError(f"image_max_upscale must be positive or null, got {max_upscale!r}")
        native_short = float(np.median(np.minimum(heights, widths)))
        short = min(short, _round_to(native_short * float(max_upscale), multiple))
    aspect = float(np.median(np.maximum(heights, widths) / np.minimum(heights, widths)))
    long = max(short, _round_to(short * aspect, multiple))
    portrait = int(np.sum(heights > widths)) > len(sizes) / 2
    return (long, short) if portrait else (short, long)


def working_size_record(
    pool_paths: Sequence[str],
    image_size: int | Sequence[int],
    *,
    layout: str = "keep_aspect",
    multiple: int = 16,
    max_upscale: float | None = None,
) -> dict:
    """JSON record of the resolved working size: ``{"image_size": [H, W], ...}`` plus how it was found."""
    sizes = read_image_sizes(pool_paths) if layout == "keep_aspect" and isinstance(image_size, (int, np.integer)) else []
    height, width = resolve_working_size(sizes, image_size, layout=layout, multiple=multiple, max_upscale=max_upscale)
    aspects = [max(h, w) / min(h, w) for h, w in sizes]
    return {
        "image_size": [height, width],
        "layout": layout,
        "requested": list(as_hw(image_size)) if not isinstance(image_size, (int, np.integer)) else int(image_size),
        "multiple": int(multiple),
        "max_upscale": None if max_upscale is None else float(max_upscale),
        "pool_images": len(pool_paths),
        "median_native_hw": [int(np.median([h for h, _ in sizes])), int(np.median([w for _, w in sizes]))] if sizes else None,
        "median_aspect": float(np.median(aspects)) if aspects else None,
    }


def fit_to_size(image: np.ndarray, size: int | Sequence[int], *, mask: bool = False) -> np.ndarray:
    """Resize ``image`` keeping its aspect so that it covers ``size``, then centre-crop to it.

    Used when an image's aspect differs from the model's working size (a new camera, a cropped
    part): squeezing would change the defects' shape the model learned, while cover + crop keeps
    the scale right and loses only the margins of the longer side. Same aspect: a plain resize.
    ``mask``: ``image`` is an (H, W) label mask, resized nearest-neighbour.
    """
    from fsad_pipeline.data.images import resize_image, resize_mask

    height, width = as_hw(size)
    in_h, in_w = image.shape[:2]
    # The centre region of the source with the target's aspect, cropped *before* resizing: the
    # same picture as resizing to cover and cropping after, without ever holding the covering
    # image (a 1 x 100 000 strip would otherwise become 100 000 x 100 000 pixels).
    crop_h = min(in_h, max(1, round(in_w * height / width)))
    crop_w = min(in_w, max(1, round(in_h * width / height)))
    top, left = (in_h - crop_h) // 2, (in_w - crop_w) // 2
    region = np.ascontiguousarray(image[top : top + crop_h, left : left + crop_w])
    return np.ascontiguousarray((resize_mask if mask else resize_image)(region, (height, width)))


def capped_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """``(height, width)`` scaled down, aspect kept, so the long side is at most ``max_side`` (None: as is)."""
    if not max_side or max(height, width) <= int(max_side):
        return int(height), int(width)
    scale = int(max_side) / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class ResizedMaps(Sequence):
    """Maps (N, h, w) seen at per-image sizes, bilinearly resized one at a time on access.

    Pixel metrics at the ground truth's own resolution need every working-size map upsampled to
    its mask's native size; resizing lazily keeps one float32 copy alive at a time per reader
    instead of a second full-resolution stack per scorer.
    """

    def __init__(self, maps: np.ndarray, sizes: Sequence[tuple[int, int]]):
        if len(maps) != len(sizes):
            raise ValueError(f"{len(maps)} maps for {len(sizes)} sizes")
        self.maps = maps
        self.sizes = [as_hw(size) for size in sizes]

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        import cv2

        height, width = self.sizes[index]
        amap = np.asarray(self.maps[index], dtype=np.float32)
        if amap.shape == (height, width):
            return amap
        # cv2's INTER_LINEAR is bilinear with half-pixel centres (align_corners=False).
        return cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)


# --------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile starts along one axis: evenly spread, the last flush with the end, >= ``overlap`` shared."""
    if tile >= length:
        return [0]
    step = max(1, int(math.floor(tile * (1.0 - overlap))))
    count = math.ceil((length - tile) / step) + 1
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def tile_image(
    image: np.ndarray, tile_hw: int | Sequence[int], overlap: float = 0.25
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Cut an (H, W, ...) image into overlapping tiles of ``tile_hw``.

    Returns ``(tiles (n, th, tw, ...), boxes [(top, left, bottom, right), ...])``. Neighbouring
    tiles share at least ``overlap`` of a tile; the last tile of a row/column is flush with the
    border, so every pixel is covered. An image smaller than a tile along an axis is padded by
    reflection there first (its box then reaches past the image and :func:`stitch_maps` crops).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    tile_h, tile_w = as_hw(tile_hw)
    height, width = image.shape[:2]
    pad_h, pad_w = max(0, tile_h - height), max(0, tile_w - width)
    if pad_h or pad_w:
        pad = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2)
        image = np.pad(image, pad, mode="reflect" if min(height, width) > 1 else "edge")
    boxes = [
        (top, left, top + tile_h, left + tile_w)
        for top in _starts(image.shape[0], tile_h, overlap)
        for left in _starts(image.shape[1], tile_w, overlap)
    ]
    tiles = np.stack([image[t:b, l:r] for t, l, b, r in boxes])
    return tiles, boxes


def stitch_maps(
    maps: np.ndarray, boxes: Sequence[tuple[int, int, int, int]], out_hw: int | Sequence[int]
) -> np.ndarray:
    """Average per-tile maps (n, th, tw) back into one (H, W) map.

    Overlaps are averaged rather than max-ed: each tile's map is noisier near its own border
    (zero-padded convolutions, fewer neighbours), and the mean of the overlapping tiles keeps a
    constant map constant and does not raise the background where tiles meet.
    """
    height, width = as_hw(out_hw)
    maps = np.asarray(maps, dtype=np.float32)
    if len(maps) != len(boxes):
        raise ValueError(f"{len(maps)} maps for {len(boxes)} boxes")
    full_h = max([height] + [b for _, _, b, _ in boxes])
    full_w = max([width] + [r for _, _, _, r in boxes])
    total = np.zeros((full_h, full_w), np.float64)
    count = np.zeros((full_h, full_w), np.float64)
    for tile_map, (top, left, bottom, right) in zip(maps, boxes):
        if tile_map.shape != (bottom - top, right - left):
            raise ValueError(f"a map of shape {tile_map.shape} for box {(top, left, bottom, right)}")
        total[top:bottom, left:right] += tile_map
        count[top:bottom, left:right] += 1
    covered = count[:height, :width]
    if (covered == 0).any():
        raise ValueError("the boxes leave pixels of the output uncovered")
    return (total[:height, :width] / covered).astype(np.float32)


__all__ = [
    "LAYOUTS",
    "ResizedMaps",
    "capped_size",
    "as_hw",
    "check_size_multiple",
    "fit_to_size",
    "image_size_matches",
    "read_image_sizes",
    "resolve_working_size",
    "stitch_maps",
    "tile_image",
    "working_size_record",
]
