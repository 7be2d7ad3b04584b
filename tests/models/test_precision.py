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


def test_autocast_runs_matmuls_in_the_dtype_and_none_in_float32() -> None:
    weights, inputs = torch.randn(8, 8), torch.randn(4, 8)
    with autocast(torch.bfloat16, "cpu"):
        assert (inputs @ weights).dtype == torch.bfloat16
        with autocast(None, "cpu"):  # switches an enclosing autocast off
            assert (inputs @ weights).dtype == torch.float32
    with autocast(None, "cpu"):
        assert (inputs @ weights).dtype == torch.float32
