"""Tests of the compute-precision setting (float32 / bfloat16 autocast)."""

from __future__ import annotations

import pytest
import torch

from fsad_pipeline.models import precision
from fsad_pipeline.models.precision import autocast, resolve_precision


def test_fp32_and_bf16_resolve_whatever_the_chip() -> None:
    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_takes_bfloat16_only_where_the_chip_does_it_natively(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    assert resolve_precision("auto", "cpu") is (torch.bfloat16 if native else None)


def test_a_chip_without_bf16_instructions_is_not_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not precision.native_bf16("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision.native_bf16("cpu")


@pytest.mark.parametrize(("capability", "native"), [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_a_cuda_device_is_native_from_ampere_on_even_where_torch_would_emulate(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], native: bool
) -> None:
    """A T4 (7.5) reports bf16 "supported" through emulation, slower than float32: not native."""
    asked: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or capability)
    assert precision.native_bf16("cuda:1") is native
    assert asked == [1]  # the device asked about, not the current one


def test_autocast_runs_matmuls_in_the_dtype_and_none_in_float32() -> None:
    weights, inputs = torch.randn(8, 8), torch.randn(4, 8)
    with autocast(torch.bfloat16, "cpu"):
        assert (inputs @ weights).dtype == torch.bfloat16
        with autocast(None, "cpu"):  # switches an enclosing autocast off
            assert (inputs @ weights).dtype == torch.float32
    with autocast(None, "cpu"):
        assert (inputs @ weights).dtype == torch.float32
