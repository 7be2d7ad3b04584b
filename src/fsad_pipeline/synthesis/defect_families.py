"""Pseudo-anomaly *families* for the synthetic validation split (issue 16).

The DFD training split pastes large Perlin-shaped textures; a validation split built the same
way is separated perfectly by every scorer (image AUROC 1.0), so it cannot tell the fusion which
scorer to trust and it favours DFD, trained on that very generator. Real defects are mostly
small: thin cracks and scratches (KolektorSDD: 1-3 px wide after resizing), speckles about one
feature patch wide, contamination, cuts, holes, missing parts, colour blotches. Each family here
imitates one of them:

``scratch``   a thin polyline with a small random walk, darker or brighter than the image;
``speckle``   1-6 small dots of about 3 px up to one feature patch (8 px at 256 px);
``cutpaste``  a small, possibly rotated rectangle of the part's own image copied elsewhere;
``blotch``    a smooth brightness / colour shift inside a soft (Gaussian-smoothed) ellipse;
``missing``   a region of the object replaced by the background (or, without a background,
              by the heavily blurred image);
``perlin``    the DFD texture paste (:func:`~.anomalies.paste_texture_anomaly`).

Every family is a pure function ``(image uint8 H×W×3, foreground H×W, rng, params) ->
(augmented uint8 H×W×3, mask uint8 H×W {0, 1})``. Sizes are fractions of the image's *shorter*
side, so a defect keeps its look at any (H, W), square or not. Apart from ``perlin`` (whose
β-blend may leave a pixel equal to the image) the mask is *exactly* the set of changed pixels,
inside the foreground. A family may miss (an empty mask, e.g. a scratch drawn off the object):
:func:`make_family_anomaly` then redraws, and raises :class:`FamilyFailure` after
``max_tries`` misses, so a label-1 row never carries an empty mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import cv2
import numpy as np

from .anomalies import NORMAL_FAMILY, paste_texture_anomaly
from .textures import TextureBank

logger = logging.getLogger(__name__)

FAMILY_NAMES = ("perlin", "scratch", "speckle", "cutpaste", "blotch", "missing")
#: Families that need a background to take the fill from; dropped where the foreground is
#: the whole image (textures), as the issue asks.
NEEDS_BACKGROUND = frozenset({"missing"})
DEFAULT_MAX_TRIES = 20

Result = tuple[np.ndarray, np.ndarray]  # (augmented uint8 H×W×3, mask uint8 H×W {0, 1})


class FamilyFailure(RuntimeError):
    """A family drew only empty masks (nothing changed inside the foreground) ``max_tries`` times."""


# --------------------------------------------------------------------------- parameters


def _check_range(name: str, value: tuple[float, float], low: float = 0.0, high: float = math.inf) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be a range [lo, hi] with {low} <= lo <= hi <= {high}, got {value}")


class _Params:
    """``from_dict`` for the frozen parameter dataclasses (YAML lists become tuples, typos raise)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None):
        data = dict(data or {})
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class ScratchParams(_Params):
    """A thin crack: ``width_fraction`` and ``length_fraction`` of the shorter side (the width is
    rounded to whole pixels, at least 1), ``n_segments`` polyline pieces whose heading turns by
    N(0, ``turn_deg``) each, drawn ``contrast`` of the way towards black (probability
    ``dark_probability``) or white."""

    width_fraction: tuple[float, float] = (0.004, 0.012)  # 1-3 px at 256 px
    length_fraction: tuple[float, float] = (0.08, 0.35)
    n_segments: int = 6
    turn_deg: float = 20.0
    contrast: tuple[float, float] = (0.15, 0.5)
    dark_probability: float = 0.7

    def __post_init__(self) -> None:
        _check_range("width_fraction", self.width_fraction)
        _check_range("length_fraction", self.length_fraction)
        _check_range("contrast", self.contrast, 0.0, 1.0)
        if self.n_segments < 1 or not 0.0 <= self.dark_probability <= 1.0:
            raise ValueError("n_segments must be >= 1 and dark_probability in [0, 1]")


@dataclass(frozen=True)
class SpeckleParams(_Params):
    """``count`` non-overlapping elliptic dots of major diameter ``diameter_fraction`` of the
    shorter side (minor = major × ``aspect``), each shifted ``shift`` towards black or white."""

    count: tuple[int, int] = (1, 6)
    diameter_fraction: tuple[float, float] = (0.012, 0.031)  # 3-8 px at 256 px (one stride-8 patch)
    aspect: tuple[float, float] = (0.6, 1.0)
    shift: tuple[float, float] = (0.15, 0.5)
    dark_probability: float = 0.5

    def __post_init__(self) -> None:
        _check_range("count", self.count, 1)
        _check_range("diameter_fraction", self.diameter_fraction)
        _check_range("aspect", self.aspect, 0.0, 1.0)
        _check_range("shift", self.shift, 0.0, 1.0)
        if not 0.0 <= self.dark_probability <= 1.0:
            raise ValueError("dark_probability must be in [0, 1]")


@dataclass(frozen=True)
class CutPasteParams(_Params):
    """CutPaste: a rectangle of side ``size_fraction`` (geometric mean of its sides, as a
    fraction of the shorter side) and width/height ``aspect``, rotated by U(``rotation_deg``),
    copied from one foreground point to another at least ``min_shift`` patch sizes away."""

    size_fraction: tuple[float, float] = (0.04, 0.12)
    aspect: tuple[float, float] = (0.5, 2.0)
    rotation_deg: tuple[float, float] = (-45.0, 45.0)
    min_shift: float = 1.0

    def __post_init__(self) -> None:
        _check_range("size_fraction", self.size_fraction)
        _check_range("aspect", self.aspect)
        _check_range("rotation_deg", self.rotation_deg, -360.0, 360.0)


@dataclass(frozen=True)
class BlotchParams(_Params):
    """A soft stain: an ellipse of semi-axes ``axis_fraction`` of the shorter side, blurred by a
    Gaussian of σ = ``softness`` × mean semi-axis, adds ``amplitude`` × 255 × a direction (grey
    ±1 plus N(0, ``colour_jitter``) per channel, scaled to a largest component of 1; no jitter on
    a grey image, whose channels are all equal). Pixels
    changed by at most ``change_threshold`` × 255 are left untouched, so faint rims are neither
    changed nor labelled."""

    axis_fraction: tuple[float, float] = (0.03, 0.12)
    amplitude: tuple[float, float] = (0.1, 0.3)
    softness: float = 0.5
    colour_jitter: float = 0.5
    dark_probability: float = 0.5
    change_threshold: float = 0.02

    def __post_init__(self) -> None:
        _check_range("axis_fraction", self.axis_fraction)
        _check_range("amplitude", self.amplitude, 0.0, 1.0)
        if self.softness < 0 or self.colour_jitter < 0 or not 0.0 <= self.change_threshold < 1.0:
            raise ValueError("softness and colour_jitter must be >= 0, change_threshold in [0, 1)")


@dataclass(frozen=True)
class MissingParams(_Params):
    """A missing piece: an ellipse (semi-axes ``axis_fraction`` of the shorter side) of the
    object replaced by the median background colour, or without background by the image
    blurred with σ = ``blur_fraction`` of the shorter side."""

    axis_fraction: tuple[float, float] = (0.04, 0.12)
    blur_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check_range("axis_fraction", self.axis_fraction)
        if self.blur_fraction <= 0:
            raise ValueError("blur_fraction must be > 0")


@dataclass(frozen=True)
class PerlinParams(_Params):
    """The DFD paste: β ~ U(``beta_range``), ``perlin`` = :func:`~.perlin.perlin_mask` keywords,
    ``texture_ops`` random augmenter ops on the texture."""

    beta_range: tuple[float, float] = (0.0, 0.8)
    perlin: dict[str, Any] = field(default_factory=dict)
    texture_ops: int = 3

    def __post_init__(self) -> None:
        _check_range("beta_range", self.beta_range, 0.0, 1.0)


# --------------------------------------------------------------------------- helpers


def _check_inputs(image: np.ndarray, foreground: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H×W×3 RGB image, got {image.dtype} {image.shape}")
    if foreground is None:
        return image, np.ones(image.shape[:2], dtype=bool)
    fg = np.asarray(foreground) > 0
    if fg.shape != image.shape[:2]:
        raise ValueError(f"foreground shape {fg.shape} != image shape {image.shape[:2]}")
    if not fg.any():
        raise ValueError("the foreground mask is empty: nowhere to draw a defect")
    return image, fg


def _short_side(image: np.ndarray) -> int:
    return int(min(image.shape[:2]))


def _foreground_point(foreground: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A uniformly random foreground pixel centre, as (x, y)."""
    flat = np.flatnonzero(foreground)
    index = int(flat[int(rng.integers(0, flat.size))])
    y, x = divmod(index, foreground.shape[1])
    return float(x), float(y)


def _towards(image: np.ndarray, amount: np.ndarray | float, dark: np.ndarray | bool) -> np.ndarray:
    """Move intensities ``amount`` of the way to black (``dark``) or to white, as float32."""
    values = image.astype(np.float32)
    amount = np.asarray(amount, dtype=np.float32)
    dark = np.asarray(dark, dtype=bool)
    if amount.ndim == 2:
        amount, dark = amount[..., None], dark[..., None]
    return np.where(dark, values * (1.0 - amount), values + amount * (255.0 - values))


def _finish(image: np.ndarray, changed: np.ndarray, region: np.ndarray, foreground: np.ndarray) -> Result:
    """Keep ``changed`` (float or uint8 H×W×3) only inside ``region`` ∩ foreground where it
    differs from ``image`` after rounding: the returned mask is exactly the changed pixels."""
    new = np.clip(np.rint(changed), 0, 255).astype(np.uint8)
    mask = (region > 0) & foreground & (new != image).any(axis=-1)
    out = np.where(mask[..., None], new, image)
    return out, mask.astype(np.uint8)


def _ellipse(
    shape: tuple[int, int], centre: tuple[float, float], axes: tuple[float, float], angle_deg: float
) -> np.ndarray:
    """Filled, not anti-aliased ellipse (uint8 {0, 1}) with sub-pixel centre and axes."""
    canvas = np.zeros(shape, dtype=np.uint8)
    shift = 4  # cv2 fixed-point bits: 1/16 px precision
    scale = 1 << shift
    cv2.ellipse(
        canvas,
        (int(round(centre[0] * scale)), int(round(centre[1] * scale))),
        (max(1, int(round(axes[0] * scale))), max(1, int(round(axes[1] * scale)))),
        float(angle_deg), 0.0, 360.0, 1, -1, cv2.LINE_8, shift,
    )
    return canvas


# --------------------------------------------------------------------------- families


def scratch(
    image: np.ndarray, foreground: np.ndarray | None, rng: np.random.Generator, params: ScratchParams
) -> Result:
    """A thin crack or scratch: a random-walk polyline centred on a foreground point.

    Drawn 1 px wide without anti-aliasing (``cv2.LINE_8``) and dilated by a ``width``-pixel
    elliptic kernel: cv2's own thick lines are ~3 px already at ``thickness=2``.
    """
    image, fg = _check_inputs(image, foreground)
    short = _short_side(image)
    low, high = (max(1, int(round(f * short))) for f in params.width_fraction)
    width = int(rng.integers(low, high + 1))
    length = rng.uniform(*params.length_fraction) * short
    turns = rng.normal(0.0, np.radians(params.turn_deg), params.n_segments)
    headings = rng.uniform(0.0, 2.0 * np.pi) + np.cumsum(turns)
    steps = (length / params.n_segments) * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    points = np.vstack([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    points += np.asarray(_foreground_point(fg, rng)) - points.mean(axis=0)
    region = np.zeros(image.shape[:2], dtype=np.uint8)
    cv2.polylines(region, [np.rint(points).astype(np.int32)], False, 1, 1, cv2.LINE_8)
    if width > 1:
        region = cv2.dilate(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width)))
    contrast = rng.uniform(*params.contrast)
    dark = rng.random() < params.dark_probability
    return _finish(image, _towards(image, contrast, dark), region, fg)


def speckle(
    image: np.ndarray, foreground: np.ndarray | None, rng: np.random.Generator, params: SpeckleParams
) -> Result:
    """1-6 small dots on foreground points, apart from each other (so each stays its own blob),
    each with its own intensity shift and direction."""
    image, fg = _check_inputs(image, foreground)
    height, width = image.shape[:2]
    short = _short_side(image)
    count = int(rng.integers(params.count[0], params.count[1] + 1))
    amount = np.zeros((height, width), dtype=np.float32)
    dark = np.zeros((height, width), dtype=bool)
    region = np.zeros((height, width), dtype=np.uint8)
    placed: list[tuple[float, float, float]] = []
    for _ in range(count * DEFAULT_MAX_TRIES):
        if len(placed) == count:
            break
        diameter = max(1.0, rng.uniform(*params.diameter_fraction) * short)
        pixel_x, pixel_y = _foreground_point(fg, rng)
        x, y = pixel_x + rng.uniform(-0.5, 0.5), pixel_y + rng.uniform(-0.5, 0.5)
        if any(math.hypot(x - px, y - py) <= (diameter + pd) / 2.0 + 1.0 for px, py, pd in placed):
            continue  # touching dots would merge into one larger blob
        axes = (diameter / 2.0, diameter / 2.0 * rng.uniform(*params.aspect))
        dot = _ellipse((height, width), (x, y), axes, rng.uniform(0.0, 180.0)).astype(bool)
        dot[int(pixel_y), int(pixel_x)] = True  # a dot below one pixel still marks its foreground centre
        region |= dot
        amount[dot] = rng.uniform(*params.shift)
        dark[dot] = rng.random() < params.dark_probability
        placed.append((x, y, diameter))
    return _finish(image, _towards(image, amount, dark), region, fg)


def cutpaste(
    image: np.ndarray, foreground: np.ndarray | None, rng: np.random.Generator, params: CutPasteParams
) -> Result:
    """CutPaste (Li et al. 2021): a small rotated rectangle of the image pasted elsewhere.

    The patch is copied pixel for pixel (nearest neighbour, reflected border) by one inverse
    affine warp; the mask is the rotated rectangle (``fillPoly`` without anti-aliasing).
    """
    image, fg = _check_inputs(image, foreground)
    height, width = image.shape[:2]
    short = _short_side(image)
    size = rng.uniform(*params.size_fraction) * short
    aspect = math.exp(rng.uniform(math.log(params.aspect[0]), math.log(params.aspect[1])))
    patch_w, patch_h = max(1.0, size * math.sqrt(aspect)), max(1.0, size / math.sqrt(aspect))
    angle = math.radians(rng.uniform(*params.rotation_deg))
    target = np.asarray(_foreground_point(fg, rng))
    source = np.asarray(_foreground_point(fg, rng))
    for _ in range(DEFAULT_MAX_TRIES):  # a copy onto (nearly) itself changes nothing visible
        if np.hypot(*(source - target)) >= params.min_shift * size:
            break
        source = np.asarray(_foreground_point(fg, rng))
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    inverse = np.hstack([rotation, (source - rotation @ target)[:, None]])  # target pixel -> source pixel
    warped = cv2.warpAffine(
        image, inverse, (width, height), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * [patch_w / 2.0, patch_h / 2.0]
    polygon = corners @ rotation + target  # rotation.T applied to each corner: source rect -> target
    region = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(region, [np.rint(polygon).astype(np.int32)], 1, cv2.LINE_8)
    return _finish(image, warped, region, fg)


def _random_ellipse(
    image: np.ndarray, fg: np.ndarray, rng: np.random.Generator, axis_fraction: tuple[float, float]
) -> tuple[np.ndarray, tuple[float, float]]:
    """A randomly oriented ellipse centred in the foreground, its semi-axes ``axis_fraction`` of
    the short side: the filled uint8 mask and the axes (draws: axes, centre, angle)."""
    axes = tuple(rng.uniform(*axis_fraction) * _short_side(image) for _ in range(2))
    centre = _foreground_point(fg, rng)
    return _ellipse(image.shape[:2], centre, axes, rng.uniform(0.0, 180.0)), axes


def blotch(
    image: np.ndarray, foreground: np.ndarray | None, rng: np.random.Generator, params: BlotchParams
) -> Result:
    """A smooth brightness / colour stain; the mask is where the change exceeds the threshold."""
    image, fg = _check_inputs(image, foreground)
    solid, axes = _random_ellipse(image, fg, rng, params.axis_fraction)
    solid = solid.astype(np.float32)
    sigma = params.softness * float(np.mean(axes))
    weight = cv2.GaussianBlur(solid, (0, 0), sigma) if sigma > 0 else solid
    weight /= float(weight.max()) or 1.0
    sign = -1.0 if rng.random() < params.dark_probability else 1.0
    jitter = rng.standard_normal(3)
    grey = bool((image == image[..., :1]).all())  # a tint on a grey part would be trivially visible
    direction = sign + (0.0 if grey else params.colour_jitter) * jitter
    direction /= float(np.abs(direction).max()) or 1.0
    delta = weight[..., None] * (rng.uniform(*params.amplitude) * 255.0 * direction)
    changed = image.astype(np.float32) + delta
    change = np.abs(np.clip(np.rint(changed), 0, 255) - image.astype(np.float32)).max(axis=-1)
    visible = change > params.change_threshold * 255.0
    return _finish(image, changed, visible, fg)


def missing(
    image: np.ndarray, foreground: np.ndarray | None, rng: np.random.Generator, params: MissingParams
) -> Result:
    """A hole or a missing piece: an ellipse of the object filled with what lies behind it."""
    image, fg = _check_inputs(image, foreground)
    short = _short_side(image)
    region, _ = _random_ellipse(image, fg, rng, params.axis_fraction)
    if fg.all():
        fill = cv2.GaussianBlur(image, (0, 0), params.blur_fraction * short)
    else:
        fill = np.broadcast_to(np.median(image[~fg], axis=0), image.shape)
    return _finish(image, fill, region, fg)


def perlin(
    image: np.ndarray, foreground: np.ndarray | None, rng: np.random.Generator, params: PerlinParams,
    textures: TextureBank | None = None,
) -> Result:
    """The DFD training recipe's paste, unrotated (needs ``textures``)."""
    image, fg = _check_inputs(image, foreground)
    if textures is None:
        raise ValueError("the perlin family needs a TextureBank (textures=...)")
    return paste_texture_anomaly(
        image, fg.astype(np.uint8), rng, textures,
        beta_range=params.beta_range, perlin_kwargs=dict(params.perlin), augment_ops=params.texture_ops,
    )


FamilyFunction = Callable[..., Result]
FAMILIES: dict[str, tuple[FamilyFunction, type[_Params]]] = {
    "perlin": (perlin, PerlinParams),
    "scratch": (scratch, ScratchParams),
    "speckle": (speckle, SpeckleParams),
    "cutpaste": (cutpaste, CutPasteParams),
    "blotch": (blotch, BlotchParams),
    "missing": (missing, MissingParams),
}
assert tuple(FAMILIES) == FAMILY_NAMES


def make_family_anomaly(
    name: str,
    image: np.ndarray,
    foreground: np.ndarray | None,
    rng: np.random.Generator,
    params: _Params | Mapping[str, Any] | None = None,
    *,
    textures: TextureBank | None = None,
    max_tries: int = DEFAULT_MAX_TRIES,
) -> tuple[np.ndarray, np.ndarray]:
    """One anomaly of family ``name``: ``(augmented uint8 H×W×3, mask uint8 {0, 1})``.

    ``params`` is the family's parameter dataclass, a dict for its ``from_dict``, or ``None``
    (the defaults). Empty draws are repeated; after ``max_tries`` of them
    :class:`FamilyFailure` is raised, so a returned mask is never empty.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown defect family {name!r}; choose one of {FAMILY_NAMES}")
    function, params_type = FAMILIES[name]
    if not isinstance(params, params_type):
        params = params_type.from_dict(params)
    extra = {"textures": textures} if name == "perlin" else {}
    for _ in range(max(1, int(max_tries))):
        augmented, mask = function(image, foreground, rng, params, **extra)
        if mask.any():
            return augmented, mask
    raise FamilyFailure(f"family {name!r} changed no foreground pixel in {max_tries} tries")


@dataclass(frozen=True)
class FamilyConfig:
    """Sampling weights of the families and each family's strength parameters.

    Built from ``synthesis.validation`` by :meth:`from_dict`: ``families`` (weights; a family
    left out or at 0 is never drawn), ``family_params`` (per family, see the ``*Params``
    classes) and ``max_tries``.
    """

    weights: dict[str, float]
    params: dict[str, _Params]
    max_tries: int = DEFAULT_MAX_TRIES

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown defect families {unknown}; choose from {FAMILY_NAMES}")
        values = list(self.weights.values())
        if any(w < 0 or not math.isfinite(w) for w in values) or not any(values):
            raise ValueError(f"family weights must be finite, >= 0 and not all 0, got {self.weights}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FamilyConfig:
        """``{"families": {name: weight}, "family_params": {name: {...}}, "max_tries": n}``."""
        weights = {str(k): float(v) for k, v in dict(data["families"]).items()}
        given = dict(data.get("family_params") or {})
        unknown = sorted(set(given) - set(FAMILIES))
        if unknown:
            raise ValueError(f"family_params for unknown families {unknown}; choose from {FAMILY_NAMES}")
        params = {name: params_type.from_dict(given.get(name)) for name, (_, params_type) in FAMILIES.items()}
        return cls(weights=weights, params=params, max_tries=int(data.get("max_tries", DEFAULT_MAX_TRIES)))

    def available(self, foreground: np.ndarray | None) -> dict[str, float]:
        """The weights that apply on an image with this foreground (no ``missing`` without background)."""
        whole = foreground is None or bool((np.asarray(foreground) > 0).all())
        return {n: w for n, w in self.weights.items() if w > 0 and not (whole and n in NEEDS_BACKGROUND)}

    def draw(
        self, image: np.ndarray, foreground: np.ndarray | None, rng: np.random.Generator,
        textures: TextureBank | None = None,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """A family drawn by weight, then its anomaly: ``(augmented, mask, family name)``.

        Should the family fail (:class:`FamilyFailure`), the others are tried by decreasing
        weight (logged), so one unlucky image does not stop the split.
        """
        weights = self.available(foreground)
        if not weights:
            raise ValueError(f"no family applies to this image (weights {self.weights}, no background)")
        names = list(weights)
        probabilities = np.array([weights[n] for n in names]) / sum(weights.values())
        first = names[int(rng.choice(len(names), p=probabilities))]
        order = [first] + sorted((n for n in names if n != first), key=lambda n: -weights[n])
        for name in order:
            try:
                augmented, mask = make_family_anomaly(
                    name, image, foreground, rng, self.params.get(name),
                    textures=textures, max_tries=self.max_tries,
                )
            except FamilyFailure as error:
                logger.warning("%s; trying the next family", error)
                continue
            return augmented, mask, name
        raise FamilyFailure(f"no family {order} changed a foreground pixel")


def family_example_rows(family: np.ndarray, n_max: int) -> np.ndarray:
    """Row indices for an examples figure: the anomaly families in turn (in order of first
    appearance), one row of each per round, then one ``"normal"`` row; at most ``n_max`` rows."""
    family = np.asarray(family, dtype=str)
    normal_rows = np.flatnonzero(family == NORMAL_FAMILY)
    budget = int(n_max) - (1 if normal_rows.size and n_max > 1 else 0)
    names = [n for n in dict.fromkeys(family.tolist()) if n != NORMAL_FAMILY]
    queues = [list(np.flatnonzero(family == n)) for n in names]
    rows: list[int] = []
    while len(rows) < budget and any(queues):
        for queue in queues:
            if queue and len(rows) < budget:
                rows.append(int(queue.pop(0)))
    if normal_rows.size and len(rows) < n_max:
        rows.append(int(normal_rows[0]))
    return np.asarray(rows, dtype=np.int64)


__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "BlotchParams",
    "CutPasteParams",
    "FamilyConfig",
    "FamilyFailure",
    "MissingParams",
    "PerlinParams",
    "ScratchParams",
    "SpeckleParams",
    "family_example_rows",
    "make_family_anomaly",
]
