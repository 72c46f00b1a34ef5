"""Rounding helpers shared by the Triton kernels that reproduce a reference's bf16 rounding points.

A fused kernel computes in fp32 and rounds once; transformers and peft round after every op in
the model dtype. Where the gradients must match the reference's error pattern (the bf16
conformance rule), kernels round at the same points with these helpers. Which build of
:func:`rounded` is used is decided at import, like every Triton kernel here (``TRITON_INTERPRET``
must be set before ``corept_kernels`` is imported).
"""
from __future__ import annotations

import triton
import triton.language as tl

from corept_kernels.capabilities import interpreter_active


if interpreter_active():
    @triton.jit
    def rounded(x, DT: tl.constexpr):
        """fp32 ``x`` rounded to nearest-even in storage dtype ``DT``, returned as fp32.

        Interpreter build: bf16 by integer arithmetic on the bits, because the interpreter's own
        fp32 -> bf16 conversion truncates; other dtypes by a cast there and back.
        """
        if DT == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        else:
            return x.to(DT).to(tl.float32)
else:
    @triton.jit
    def rounded(x, DT: tl.constexpr):
        """fp32 ``x`` rounded to nearest-even in storage dtype ``DT``, returned as fp32.

        Compiled build: the hardware conversion rounds to nearest-even, one instruction each way
        (with the integer form, the RoPE kernel's fwd+bwd went from 0.096 to 0.118 ms on an H200
        when it started rounding at transformers' points).
        """
        return x.to(DT).to(tl.float32)


@triton.jit
def store_rounded(ptrs, x, mask):
    """Store fp32 ``x`` at ``ptrs``, rounded to nearest-even on every backend (see ``rounded``)."""
    tl.store(ptrs, rounded(x, ptrs.dtype.element_ty).to(ptrs.dtype.element_ty), mask=mask)
