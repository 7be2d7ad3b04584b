"""Compute precision: float32, or bfloat16 autocast where the chip does it natively.

Used by DFD (``dfd.precision``: training, and the validation and scoring passes of the model it
trained), by the frozen backbones' feature passes (``features.precision``,
``memory_bank.features.precision``) and by the kNN search's matrix product
(``memory_bank.knn.precision``). A DFD training step is matrix
products over 1024 patch tokens (the adaptor, the Perlin discriminator's ViT block), a feature
pass convolutions: on a CPU with AVX512-BF16 or AMX, oneDNN runs both in bfloat16 at about twice
the float32 rate. :func:`resolve_precision` turns the ``precision`` setting into the dtype
autocast uses (``None`` = float32): ``auto`` takes bfloat16 only where it is native (AVX512-BF16
/ AMX on a CPU, a CUDA device of compute capability 8 or more), because elsewhere torch emulates
it and it is slower than float32. In training, parameters, optimiser state, losses and the
Gaussian discriminator's noise stay float32 (mixed precision, not a bfloat16 model); features
come out float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: Values of the ``precision`` setting.
PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        # Not torch.cuda.is_bf16_supported(): it also says yes where bfloat16 is only emulated
        # (pre-Ampere cards such as the T4 or V100), which is slower than float32.
        if not torch.cuda.is_available():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index)[0] >= 8
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def resolve_precision(setting: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for ``setting`` on ``device``: ``torch.bfloat16``, or None for float32.

    ``fp32``: None. ``bf16``: bfloat16 wherever autocast supports it (emulated = slow on chips
    without it). ``auto``: bfloat16 where :func:`native_bf16`, else None.
    """
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {setting!r}")
    if setting == "fp32" or (setting == "auto" and not native_bf16(device)):
        return None
    return torch.bfloat16


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None, device: str | torch.device) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device``'s type; with None, float32 (autocast switched off)."""
    device_type = torch.device(device).type
    if dtype is None:
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        with torch.autocast(device_type, dtype=dtype):
            yield
