"""Perlin gradient noise and thresholded Perlin anomaly masks (DRAEM / DFD recipe)."""

from __future__ import annotations

import math

import cv2
import numpy as np

NOISE_SCALE = math.sqrt(2.0)  # brings 2-D Perlin noise to roughly [-1, 1]


def _fade(t: np.ndarray) -> np.ndarray:
    """Quintic smoothstep 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def rotate_about_center(
    array: np.ndarray,
    angle_deg: float,
    *,
    interpolation: int = cv2.INTER_LINEAR,
    border: int = cv2.BORDER_REFLECT_101,
) -> np.ndarray:
    """Rotate a 2-D or H×W×C array about its centre, keeping its size and dtype."""
    height, width = array.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), float(angle_deg), 1.0)
    rotated = cv2.warpAffine(
        np.ascontiguousarray(array), matrix, (width, height), flags=interpolation, borderMode=border
    )
    if array.ndim == 3 and rotated.ndim == 2:  # cv2 drops a singleton channel axis
        rotated = rotated[..., None]
    return rotated


def perlin_noise(
    shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """2-D Perlin gradient noise of ``shape`` with ``res`` lattice cells per axis.

    Random unit gradients at the (ry+1)×(rx+1) lattice points, quintic fade, bilinear
    interpolation of the corner dot products, scaled by √2 (values roughly in [-1, 1]).
    Unlike the reference, ``shape`` need not be divisible by ``res``: the noise is generated
    at the next multiple and cropped.
    """
    height, width = int(shape[0]), int(shape[1])
    res_y, res_x = int(res[0]), int(res[1])
    if height <= 0 or width <= 0 or res_y <= 0 or res_x <= 0:
        raise ValueError(f"shape and res must be positive, got shape={shape}, res={res}")
    cell_y = -(-height // res_y)  # ceil: pixels per cell after padding to a multiple
    cell_x = -(-width // res_x)

    angles = rng.uniform(0.0, 2.0 * np.pi, size=(res_y + 1, res_x + 1))
    grad_y = np.cos(angles)
    grad_x = np.sin(angles)

    pos_y = np.arange(height) / cell_y
    pos_x = np.arange(width) / cell_x
    idx_y = np.floor(pos_y).astype(np.int64)
    idx_x = np.floor(pos_x).astype(np.int64)
    frac_y = (pos_y - idx_y)[:, None]
    frac_x = (pos_x - idx_x)[None, :]
    iy = idx_y[:, None]
    ix = idx_x[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        gy = grad_y[iy + dy, ix + dx]
        gx = grad_x[iy + dy, ix + dx]
        return gy * (frac_y - dy) + gx * (frac_x - dx)

    t_y = _fade(frac_y)
    t_x = _fade(frac_x)
    top = corner(0, 0) + t_x * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + t_x * (corner(1, 1) - corner(1, 0))
    noise = top + t_y * (bottom - top)
    return (NOISE_SCALE * noise).astype(np.float32)


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    min_scale_exp: int = 0,
    max_scale_exp: int = 5,
    threshold: float = 0.5,
    rotation_range: tuple[float, float] | None = (-90.0, 90.0),
    area_range: tuple[float, float] | None = None,
    max_tries: int = 50,
    min_cell_px: int = 4,
) -> np.ndarray:
    """Binary Perlin blob mask (uint8 {0,1}) of ``shape``.

    Lattice resolution per axis is ``2**a`` / ``2**b`` with a, b drawn independently from
    ``[min_scale_exp, max_scale_exp]`` (DRAEM/DFD: 0..5), capped so a cell spans at least
    ``min_cell_px`` pixels (tiny images would otherwise give all-zero noise). The noise is
    rotated by U(rotation_range) degrees (``None`` = no rotation) and thresholded
    (``noise > threshold``). With ``area_range=(lo, hi)`` the draw is repeated until the
    mask fraction lies in (lo, hi); after ``max_tries`` the last draw is returned.
    Defect-classifier recipe: ``threshold=0.35, rotation_range=None, area_range=(0.1, 0.4)``.
    """
    if min_scale_exp > max_scale_exp:
        raise ValueError("min_scale_exp must be <= max_scale_exp")
    height, width = int(shape[0]), int(shape[1])
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(max(1, int(max_tries))):
        exp_y, exp_x = rng.integers(min_scale_exp, max_scale_exp + 1, size=2)
        res_y = int(min(2**exp_y, max(1, height // min_cell_px)))
        res_x = int(min(2**exp_x, max(1, width // min_cell_px)))
        noise = perlin_noise((height, width), (res_y, res_x), rng)
        if rotation_range is not None:
            angle = rng.uniform(rotation_range[0], rotation_range[1])
            # reference pads with constant 0 (harmless); reflect avoids biasing the corners
            noise = rotate_about_center(noise, angle, border=cv2.BORDER_REFLECT)
        mask = (noise > threshold).astype(np.uint8)
        if area_range is None:
            return mask
        fraction = float(mask.mean())
        if area_range[0] < fraction < area_range[1]:
            return mask
    return mask
