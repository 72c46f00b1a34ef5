"""Shared accuracy checks for kernel tests.

fp32 results are compared tightly against a float64 reference. bf16/fp16 results are judged the
way the project's standards require: the kernel's error against a float64 "gold" result must be no
worse than 2x the error of the same op computed by torch in that dtype, plus one ulp of the dtype
(the Triton interpreter truncates fp32->bf16 stores instead of rounding).
"""
from __future__ import annotations

import torch


def _ulp(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}[dtype]


def max_rel_err(out: torch.Tensor, gold: torch.Tensor) -> float:
    """max |out - gold| / (max |gold| + tiny), computed in float64."""
    out = out.detach().double()
    gold = gold.detach().double()
    assert out.shape == gold.shape, (out.shape, gold.shape)
    assert torch.isfinite(out).all(), "non-finite values (unwritten or NaN-poisoned output?)"
    return ((out - gold).abs().max() / (gold.abs().max() + 1e-30)).item()


def assert_close_fp32(out: torch.Tensor, gold: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5):
    """Tight fp32 check against a float64 (or fp32) reference."""
    assert torch.isfinite(out).all(), "non-finite values (unwritten or NaN-poisoned output?)"
    torch.testing.assert_close(out.detach().double(), gold.detach().double(), rtol=rtol, atol=atol)


def assert_low_precision_ok(out: torch.Tensor, gold: torch.Tensor, torch_lowp: torch.Tensor, name: str = ""):
    """``out`` (kernel, low precision) vs ``gold`` (float64): error <= 2 x torch_lowp's error + 1 ulp.

    All errors are max-abs errors normalised by max |gold|.
    """
    err = max_rel_err(out, gold)
    ref_err = max_rel_err(torch_lowp, gold)
    bound = 2.0 * ref_err + _ulp(out.dtype)
    assert err <= bound, f"{name}: kernel error {err:.3e} > bound {bound:.3e} (torch low-precision error {ref_err:.3e})"
