"""Rounding helpers shared by the Triton kernels that reproduce a reference's bf16 rounding points.

A fused kernel computes in fp32 and rounds once; transformers and peft round after every op in
the model dtype. Where the gradients must match the reference's error pattern (the bf16
conformance rule), kernels round at the same points with these helpers.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rounded(x, DT: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in storage dtype ``DT``, returned as fp32.

    bf16 by integer arithmetic on the bits (exact on GPUs and under the Triton interpreter, whose
    own fp32 -> bf16 conversion truncates); other dtypes by a cast there and back. A plain
    ``x.to(tl.bfloat16).to(tl.float32)`` does not work when compiled: Triton 3.6 folds the round
    trip away (tried on an H200: RoPE then matched the unrounded result, not transformers';
    ``bench/results/kernels-2026-11-28-h200-rope-foldedcast.json``).
    """
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def store_rounded(ptrs, x, mask):
    """Store fp32 ``x`` at ``ptrs``, rounded to nearest-even on every backend (see ``rounded``)."""
    tl.store(ptrs, rounded(x, ptrs.dtype.element_ty).to(ptrs.dtype.element_ty), mask=mask)
