"""The adapter branch of fp32 adapters on a bf16 model, without fp32 copies of activations.

peft runs the branch of fp32 adapters (its default) in fp32: ``x.to(fp32)``, fp32 GEMMs, an fp32
``[N, out]`` product added to the bf16 base output. On a GPU those casts, fp32 adds and
non-tensor-core fp32 GEMMs were ~30% of an 8B LoRA step (``bench/lora_branch_probe.py``,
docs/perf-notes.md). Here every GEMM takes bf16 operands and accumulates in fp32, and the values
stay fp32-accurate:

* an fp32 tensor ``t`` is carried as two bf16 parts, ``hi = bf16(t)`` and ``lo = bf16(t - hi)``,
  whose sum is ``t`` to ~2^-17 relative (:func:`split`); the big activations ``x``, ``dy`` are
  bf16 already, so they enter the GEMMs as they are;
* a product of a bf16 activation with an fp32 adapter value is the sum of its products with the
  two parts: one GEMM against the concatenated parts, fp32 output, halves summed
  (:func:`mm_f32`, :func:`sum_halves`);
* a rank-``r`` product of two fp32 factors added into a bf16 tensor (``s xa B^T`` into the base
  output, ``dxa A`` into ``dx``) is summed in fp32 registers and rounded in one Triton kernel
  (:func:`rank_add_`, :mod:`corept_kernels.lora.rank_add`): once, or twice where peft rounds the
  branch before the add. The first version used a bf16 GEMM with ``K = 3r`` split factors and
  cuBLAS's ``addmm_`` epilogue: its GPU time was small, but its ~10 extra launches per call made
  the 8B step CPU-bound (docs/perf-notes.md), and the epilogue's rounding did not pass the
  float64 check on the H200.

So the rounding points stay peft's; the values rounded differ from peft's fp32 ones only at fp32
precision (an occasional one-ulp flip of a bf16 result). On CUDA the fp32-output GEMMs are
``torch.mm(..., out_dtype=torch.float32)``; elsewhere (CPU, the interpreter tests) the same sums
are formed by upcasting chunks of the operands, which is exact for products of bf16 values.

Shapes: ``x`` ``[N, in]``, ``A`` ``[r, in]``, ``B`` ``[out, r]``, ``xa``/``dxa`` ``[N, r]``.
"""
from __future__ import annotations

import logging

import torch

from corept_kernels import capabilities
from corept_kernels.lora import chunks
from corept_kernels.lora import rank_add as _rank_add  # noqa: F401 - registers the "rank_add" kernel

logger = logging.getLogger(__name__)


def uses_split(adapter_dtype: torch.dtype, model_dtype: torch.dtype) -> bool:
    """True where this module's branch applies: fp32 adapters on a bf16 model."""
    return adapter_dtype == torch.float32 and model_dtype == torch.bfloat16


def split(t: torch.Tensor, dim: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """fp32 ``t`` as ``[hi, lo]`` concatenated along ``dim`` in ``dtype`` (``hi + lo`` = ``t``).

    Two kernels: the cast into the first half, then ``t - hi`` (computed in fp32, the promoted
    dtype, and rounded once on the store) into the second.
    """
    shape = list(t.shape)
    shape[dim] *= 2
    out = torch.empty(shape, dtype=dtype, device=t.device)
    hi, lo = out.chunk(2, dim)
    hi.copy_(t)
    torch.sub(t, hi, out=lo)
    return out


def split_blocks(t: torch.Tensor, widths, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """fp32 ``t`` ``[N, sum w]`` (blocks of columns of the given widths) as ``[N, 2 sum w]`` in
    ``dtype`` with each block's ``hi`` and ``lo`` side by side: block ``i`` of ``t`` at columns
    ``[a, b)`` becomes columns ``[2a, 2b)``, ``hi`` first.

    One :func:`split` of the whole tensor (two kernels) when the widths are equal, as for the q/k/v
    or gate/up adapters of one rank; else one per block.
    """
    widths = [int(w) for w in widths]
    if len(widths) == 1:
        return split(t, 1, dtype)
    n = t.shape[0]
    if len(set(widths)) > 1:
        return torch.cat([split(blk, 1, dtype) for blk in t.split(widths, 1)], 1)
    k, w = len(widths), widths[0]
    out = torch.empty(n, k, 2, w, dtype=dtype, device=t.device)
    src = t.reshape(n, k, w)
    hi, lo = out[:, :, 0], out[:, :, 1]
    hi.copy_(src)
    torch.sub(src, hi, out=lo)
    return out.view(n, 2 * k * w)


def stacked_row_split(Bs, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor] | None:
    """The hi/lo parts ``[out_i, 2r]`` of each fp32 ``B_i`` ``[out_i, r]``, made by one
    :func:`split` of the ``B`` stacked by rows (three kernels for the q/k/v group instead of six);
    ``None`` when the ranks differ (then each is split on its own)."""
    if len(Bs) < 2 or len({B.shape[1] for B in Bs}) > 1:
        return None
    parts = split(torch.cat(list(Bs), 0), 1, dtype)
    return list(parts.split([B.shape[0] for B in Bs], 0))


def weight_split(ts, dim: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """:func:`split` of the adapter weights ``ts`` concatenated along ``dim``.

    Made on every use, not cached: a cache keyed on the weights' version counters was measured
    (c92658f) but dropped. It held 4 bytes per adapter parameter for the whole run (0.16 GiB on an
    8B model at r 16), it saved only the recomputed forward's splits (~3 per layer per step), and
    its key could not be proven fresh for FSDP2's unsharded parameters, whose storage is refilled
    in place every step.
    """
    return split(ts[0] if len(ts) == 1 else torch.cat(list(ts), dim), dim, dtype)


def sum_halves(p: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``p`` split in two equal halves along ``dim``, summed (the products with ``hi`` and ``lo``),
    into ``out`` when given (a view of a larger tensor: saves the copy into it)."""
    a, b = p.chunk(2, dim)
    return torch.add(a, b, out=out) if out is not None else a + b


_OUT_DTYPE_MM: bool | None = None
"""Whether this torch's CUDA ``torch.mm`` takes ``out_dtype`` (None: not tried yet)."""


def lacks_out_dtype(err: BaseException) -> bool:
    """Whether ``err`` from ``torch.mm(..., out_dtype=...)`` says this torch cannot do it (an older
    torch: unknown keyword, or no kernel), as opposed to a real failure such as running out of
    memory, which must propagate instead of silently switching to the slower path."""
    if isinstance(err, torch.OutOfMemoryError):
        return False
    if isinstance(err, (TypeError, NotImplementedError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out_dtype" in text or "not implemented" in text
                                              or "not supported" in text)


def _fp32_out_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """The CUDA fp32-output GEMM, or None where this torch lacks it (then logged once)."""
    global _OUT_DTYPE_MM
    if not a.is_cuda or a.dtype not in (torch.bfloat16, torch.float16) or _OUT_DTYPE_MM is False:
        return None
    try:
        out = torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError) as e:
        if not lacks_out_dtype(e):
            raise
        _OUT_DTYPE_MM = False
        logger.warning("torch %s has no fp32-output bf16 GEMM (torch.mm out_dtype: %s); the fused LoRA "
                       "branch upcasts operand chunks instead (correct, slower)", torch.__version__, e)
        return None
    _OUT_DTYPE_MM = True
    return out


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` ``[M, K] x [K, P]`` of bf16 operands, accumulated in fp32, returned in fp32.

    On CUDA one cuBLAS GEMM with an fp32 output. Elsewhere, fp32 copies of ``K``-slices of both
    operands (each at most :data:`~corept_kernels.lora.chunks.CHUNK_BYTES`) multiplied and
    summed: products of bf16 values are exact in fp32, so this forms the same sums up to their
    order.
    """
    out = _fp32_out_mm(a, b)
    if out is not None:
        return out
    M, K = a.shape
    P = b.shape[1]
    out = torch.zeros(M, P, dtype=torch.float32, device=a.device)
    step = max(1, chunks.CHUNK_BYTES // (4 * max(M, P, 1)))
    for k in range(0, K, step):
        out.addmm_(a[:, k:k + step].float(), b[k:k + step].float())
    return out


def rank_add_(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scaling: float, round_first: bool) -> torch.Tensor:
    """``y <- round(y + round?(scaling * (u @ v)))`` in place, ``u @ v`` an fp32 rank product
    (``[M, r] x [r, N]``): the kernel of :mod:`corept_kernels.lora.rank_add` or its torch twin, as
    :func:`~corept_kernels.capabilities.dispatch` decides."""
    fn, _ = capabilities.dispatch("rank_add", y)
    fn([(y, u, v, scaling)], round_first)
    return y


# ----------------------------------------------------------------------------- the branch's products


def xa(x2: torch.Tensor, As) -> torch.Tensor:
    """``[x A_1^T, ..., x A_k^T]`` ``[N, sum r]`` fp32, for bf16 ``x2`` ``[N, in]`` and fp32 ``A_i``."""
    return sum_halves(mm_f32(x2, weight_split(tuple(As), 0, x2.dtype).t()), 1)


def add_branch_(y: torch.Tensor, xa_i: torch.Tensor, B: torch.Tensor, scaling: float, four_bit: bool) -> torch.Tensor:
    """``y`` ``[N, out]`` (base output, bf16) plus ``scaling * xa_i B^T``, rounded as peft rounds:
    once for a float base; for a 4-bit base (peft's ``Linear4bit``) the branch is rounded first."""
    return rank_add_(y, xa_i, B.t(), scaling, round_first=four_bit)


def add_branches_(ys, xas, Bs, scalings, four_bit: bool) -> None:
    """:func:`add_branch_` for the outputs of linears sharing one input (q/k/v, gate/up), in one
    kernel launch where the kernel runs: each output gets exactly the values it would alone."""
    if ys:
        fn, _ = capabilities.dispatch("rank_add", *ys)
        fn([(y, a, B.t(), s) for y, a, B, s in zip(ys, xas, Bs, scalings)], four_bit)


def dxa_dB(d: torch.Tensor, xs_i: torch.Tensor | None, B: torch.Tensor, scaling: float, need_B: bool,
           out: torch.Tensor | None = None, b_parts: torch.Tensor | None = None):
    """``(dB, dxa)`` for one linear: ``dxa = s d B`` ``[N, r]`` (written into ``out`` when given)
    and, if needed, ``dB = s d^T xa`` ``[out, r]``, both fp32, for ``d`` ``[N, out]`` bf16 (the
    output's gradient) and ``xs_i`` ``[N, 2r]``, the hi/lo parts of this linear's ``xa`` (from
    :func:`split` or a block of :func:`split_blocks`; may be ``None`` when ``dB`` is not needed).
    ``b_parts``: ``B``'s hi/lo parts ``[out, 2r]`` when the caller split several ``B`` at once
    (:func:`stacked_row_split`); else they are made here."""
    parts = b_parts if b_parts is not None else weight_split((B,), 1, d.dtype)
    dxa_i = sum_halves(mm_f32(d, parts), 1, out=out)
    dB = None
    if need_B:
        dB = sum_halves(mm_f32(d.t(), xs_i), 1)
        if scaling != 1.0:
            dB.mul_(scaling)
    if scaling != 1.0:
        dxa_i.mul_(scaling)
    return dB, dxa_i


def dA(dxa: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``dxa^T x`` ``[sum r, in]`` fp32 for fp32 ``dxa`` ``[N, sum r]`` and bf16 ``x2`` ``[N, in]``."""
    return sum_halves(mm_f32(split(dxa, 1, x2.dtype).t(), x2), 0)


def add_dx_branch_(dx: torch.Tensor, dxa_i: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``dx += round(dxa_i A)``: the branch's input gradient rounded to ``dx``'s dtype before it is
    added, as autograd accumulates peft's branch into the base's gradient."""
    return rank_add_(dx, dxa_i, A, 1.0, round_first=True)
