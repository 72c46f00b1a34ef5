"""Tolerances of the conformance kit, and the two comparisons every check uses.

* **fp32** (:func:`assert_fp32_close`): elementwise ``|a - e| <= RTOL * |e| + ATOL_SCALE * max|e|``.
  ``RTOL = 1e-4`` is the issue's bound; the absolute term is relative to the tensor's own scale so
  that near-zero elements of a gradient are judged against its magnitude, not against 0 (a Triton
  kernel sums in a different order than torch: relative errors of ~1e-7..1e-6 at the tensor scale
  are normal, 1e-5 leaves a 10x margin and still catches any real bug, which shows as >= 1e-3).
* **bf16** (:func:`assert_bf16_within`): the patched bf16 model is judged against an fp32 *gold*
  copy of the same weights, by the normalized max error ``max|x - gold| / max|gold|``. It must be
  at most ``BF16_FACTOR`` (2) times the unpatched bf16 model's own error, plus ``BF16_FLOOR``.
"""
from __future__ import annotations

import math

import torch

RTOL = 1e-4
ATOL_SCALE = 1e-5
BF16_FACTOR = 2.0
BF16_FLOOR = 2.0 ** -8
"""One bf16 ulp at the tensor's scale (bf16 keeps 8 significant bits). Needed because (1) where
the unpatched bf16 model happens to be (nearly) exact for a tensor, ``2 x 0`` would demand bitwise
equality from a different but equally valid rounding order, and (2) Triton's interpreter truncates
on fp32 -> bf16 stores instead of rounding to nearest (one ulp; shared/notes/environment.md).
One ulp covers one differently rounded store; an accumulated error (a wrong cast, a missed fp32
upcast, a dropped term) is many ulps and still fails."""


def _f(t) -> torch.Tensor:
    return t.detach().to(torch.float32) if torch.is_tensor(t) else torch.tensor(float(t))


def scaled_error(x, gold) -> float:
    """``max|x - gold| / max|gold|`` (``max|x - gold|`` when gold is all zeros); NaN-aware:
    NaN where gold is finite is an infinite error, NaN in both is agreement."""
    x, gold = _f(x), _f(gold)
    if x.shape != gold.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != gold shape {tuple(gold.shape)}")
    both_nan = torch.isnan(x) & torch.isnan(gold)
    if (torch.isnan(x) ^ torch.isnan(gold)).any():
        return math.inf
    diff = (x - gold).abs().masked_fill(both_nan, 0.0)
    scale = gold.abs().masked_fill(both_nan, 0.0).max().item() if gold.numel() else 0.0
    err = diff.max().item() if diff.numel() else 0.0
    return err / scale if scale > 0 else err


def assert_fp32_close(name: str, actual, expected) -> None:
    """Whole-tensor fp32 comparison (see the module docstring); NaNs must match exactly."""
    a, e = _f(actual), _f(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != reference {tuple(e.shape)}")
    finite = torch.isfinite(e)
    scale = e[finite].abs().max().item() if finite.any() else 0.0
    torch.testing.assert_close(a, e, rtol=RTOL, atol=max(ATOL_SCALE * scale, 1e-12), equal_nan=True,
                               msg=lambda m: f"{name}: fp32 mismatch (rtol {RTOL}, atol {ATOL_SCALE} x "
                                             f"max|ref| = {ATOL_SCALE * scale:.3g}).\n{m}")


def bf16_verdict(patched, unpatched, gold) -> tuple[bool, float, float, float]:
    """``(ok, patched_err, unpatched_err, bound)`` for the bf16 rule."""
    pe, ue = scaled_error(patched, gold), scaled_error(unpatched, gold)
    bound = BF16_FACTOR * ue + BF16_FLOOR
    return pe <= bound, pe, ue, bound


def assert_bf16_within(name: str, patched, unpatched, gold) -> None:
    """The patched bf16 tensor's error vs the fp32 gold is within 2x the unpatched bf16 error + floor."""
    ok, pe, ue, bound = bf16_verdict(patched, unpatched, gold)
    if not ok:
        raise AssertionError(f"{name}: patched bf16 error {pe:.3e} > {BF16_FACTOR} x unpatched bf16 error "
                             f"{ue:.3e} + floor {BF16_FLOOR:.3e} = {bound:.3e} (errors are max|x - gold| / "
                             f"max|gold| against the fp32 gold copy)")
