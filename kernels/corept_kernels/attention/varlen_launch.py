"""Launches of the varlen attention kernels: tile sizes, the device-built schedule, forward, backward.

Both passes share one schedule (built in the forward, saved for the backward): every ``tile``-token
span of every document, heaviest first (:func:`~corept_kernels.attention.varlen_kernels.schedule_kernel`),
built on the device from ``cu_seqlens`` in one launch, so nothing waits for the host and the grid
size ``cdiv(T, tile) + N`` depends on shapes only. A packed batch costs the sum of its documents'
causal (or windowed) attention, not ``T**2``.

Tile sizes are fixed per head width and dtype (:func:`blocks`): no run-time autotuning
(:class:`corept_kernels.tuning.Launcher` serves the memory-bound kernels). Nothing a batch's
documents decide may pick a new compiled variant: Triton specializes integer arguments on
divisibility by 16 and pointers on 16-byte alignment, so the kernels do not specialize on ``T``,
the window (``T + 1`` when there is none), the document count or the schedule's size, and the
schedule's second order starts aligned. Before, a packed run on an H100 compiled new variants at
steps 4, 5 and 7 of its first process (2.5-4.6 s steps instead of 1.1 s; docs/packing.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from corept_kernels.attention import varlen_kernels as kn
from corept_kernels.capabilities import interpreter_active

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
_DOCS = 256  # documents per step of the schedule kernel's scans

# Tests set this to True: every buffer a kernel must fill starts as NaN, so unwritten elements show.
POISON_OUTPUTS = False


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch settings for one head width and dtype.

    :param tile: tokens per program and the schedule's unit: query rows of the forward and dQ
        programs, keys of the dK/dV programs.
    :param fwd_n: keys per step of the forward; ``dq_n``: of the dQ kernel; ``kv_m``: query rows
        per step of the dK/dV kernel.
    """

    tile: int
    fwd_n: int
    dq_n: int
    kv_m: int
    fwd_warps: int
    bwd_warps: int
    fwd_stages: int
    bwd_stages: int


# (16-bit inputs, padded head dim) -> blocks: the first key whose width holds D. These are the settings
# of the committed H100 measurement (bench/results/attention-varlen-2026-12-07-h100-*.json); a tuning
# run whose output was not kept suggested 3 forward stages at D=128, to be measured before it is used.
# fp32 runs full-precision FMA matmuls: small tiles.
_BLOCKS = {
    (True, 64): Blocks(128, 64, 32, 32, fwd_warps=4, bwd_warps=4, fwd_stages=3, bwd_stages=3),
    (True, 128): Blocks(128, 64, 32, 32, fwd_warps=8, bwd_warps=8, fwd_stages=2, bwd_stages=2),
    (True, 256): Blocks(64, 32, 32, 32, fwd_warps=8, bwd_warps=8, fwd_stages=2, bwd_stages=2),
    (False, 64): Blocks(64, 32, 32, 32, fwd_warps=4, bwd_warps=4, fwd_stages=1, bwd_stages=1),
    (False, 128): Blocks(64, 32, 32, 32, fwd_warps=4, bwd_warps=4, fwd_stages=1, bwd_stages=1),
    (False, 256): Blocks(32, 32, 32, 32, fwd_warps=4, bwd_warps=8, fwd_stages=1, bwd_stages=1),
}

#: Off CUDA (the interpreter) the GPU's blocks are used unless this is set: tests set small blocks
#: to cover several tiles and blocks per document at small shapes.
BLOCKS_OFF_CUDA: Blocks | None = None


def padded_head_dim(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def blocks(D: int, dtype: torch.dtype, device: torch.device) -> Blocks:
    """The tile sizes for head dim ``D`` (``<= MAX_HEAD_DIM``) and input dtype on ``device``."""
    if BLOCKS_OFF_CUDA is not None and (device.type != "cuda" or interpreter_active()):
        return BLOCKS_OFF_CUDA
    low = dtype != torch.float32
    # D itself, not its padded width, against the power-of-two keys: D may be symbolic (fake tensors)
    return next(b for (lp, width), b in _BLOCKS.items() if lp == low and D <= width)


def schedule_rows(T: int, n_docs: int, tile: int) -> int:
    """Rows of each order of the schedule: a bound on the tiles of ``n_docs`` documents of ``T``
    tokens (symbolic sizes allowed), rounded up to a multiple of 4 so the second order starts
    16-byte aligned (rows are 3 int32): Triton compiles a kernel once per pointer alignment."""
    return ((T + tile - 1) // tile + n_docs + 3) // 4 * 4


def _empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def schedule(cu_seqlens: torch.Tensor, T: int, tile: int) -> torch.Tensor:
    """``[2, schedule_rows(T, N, tile), 3]`` int32 rows ``(start, doc_start, doc_end)``: order 0 for the
    query-tile programs, order 1 for the key-tile programs, then ``(0, 0, 0)`` padding rows."""
    cu = cu_seqlens.to(torch.int32).contiguous()
    n_docs = cu.numel() - 1
    size = schedule_rows(T, n_docs, tile)
    sched = torch.empty((2, size, 3), dtype=torch.int32, device=cu.device)
    if POISON_OUTPUTS:
        sched.fill_(-7)
    kn.schedule_kernel[(triton.cdiv(T, tile), 2)](cu, sched, n_docs, size, TILE=tile, DOCS=_DOCS, num_warps=4)
    return sched


def _options(T: int, scale: float, window: int | None, softcap: float | None):
    """(window as an int, ``qk_scale``, ``cap``) for the kernels (see ``varlen_kernels._scores``)."""
    w = T + 1 if window is None else min(window, T + 1)
    if softcap is None:
        return w, scale * LOG2E, 0.0
    return w, scale / softcap, softcap * LOG2E


def _precision(t: torch.Tensor) -> tuple[bool, str]:
    """(LOWP, PRECISION): 16-bit matmul operands on a GPU; fp32 operands get full fp32 matmuls."""
    lowp = t.dtype != torch.float32 and t.is_cuda and not interpreter_active()
    return lowp, "tf32" if lowp else "ieee"


def varlen_forward(q, k, v, cu_seqlens, scale: float, window: int | None, softcap: float | None,
                   sinks: torch.Tensor | None = None):
    """Forward of :func:`corept_kernels.attention.varlen_attention`.

    :param sinks: ``[Hq]`` sink logits (natural log) in every row's softmax; ``lse`` then includes
        them, so :func:`varlen_backward` with this ``out`` and ``lse`` gives the right dQ/dK/dV.
    :returns: ``(out [T, Hq, D]`` in ``q``'s dtype, ``lse [Hq, T]`` fp32 in base 2 (log2 of each
        row's sum of ``exp2`` of its base-2 scores), ``sched`` (:func:`schedule`), kept for the
        backward).
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    T, Hq, D = q.shape
    cfg = blocks(D, q.dtype, q.device)
    sched = schedule(cu_seqlens, T, cfg.tile)
    out = _empty((T, Hq, D), q.dtype, q.device)
    lse = _empty((Hq, T), torch.float32, q.device)
    w, qk_scale, cap = _options(T, scale, window, softcap)
    lowp, precision = _precision(q)
    sink2 = lse if sinks is None else (sinks.detach().float() * LOG2E).contiguous()  # base 2, as the scores
    kn.fwd_kernel[(Hq, sched.shape[1])](
        q, k, v, out, lse, sink2, sched[0], T, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
        qk_scale, cap, w, GROUP=Hq // k.shape[1], HEAD_DIM=D, BLOCK_D=padded_head_dim(D), TILE=cfg.tile,
        BLOCK_N=cfg.fwd_n, SOFTCAP=softcap is not None, LOWP=lowp, PRECISION=precision, SINKS=sinks is not None,
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)
    return out, lse, sched


def varlen_backward(dout, q, k, v, out, lse, sched, scale: float, window: int | None, softcap: float | None,
                    delta: torch.Tensor | None = None):
    """``(dq, dk, dv)`` (dtypes and shapes of ``q, k, v``) from ``dout [T, Hq, D]`` and the forward's
    ``out``, ``lse`` and ``sched``. dK/dV of a kv head sum its query heads' shares in one program.

    :param delta: ``[Hq, T]`` fp32 ``rowsum(dout * out)`` when the caller has it already (the sinks'
        gradient needs it too); computed here otherwise."""
    q, k, v, dout = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    cfg = blocks(D, q.dtype, q.device)
    bd = padded_head_dim(D)
    w, qk_scale, cap = _options(T, scale, window, softcap)
    lowp, precision = _precision(q)
    if delta is None:
        delta = _empty((Hq, T), torch.float32, q.device)
        rows = max(16, 4096 // bd)
        kn.delta_kernel[(Hq, triton.cdiv(T, rows))](out, dout, delta, T, *out.stride()[:2], *dout.stride()[:2],
                                                    HEAD_DIM=D, BLOCK_D=bd, ROWS=rows, num_warps=4)
    else:
        delta = delta.to(torch.float32).contiguous()
    dq = _empty((T, Hq, D), q.dtype, q.device)
    dk = _empty((T, Hkv, D), k.dtype, k.device)
    dv = _empty((T, Hkv, D), v.dtype, v.device)
    common = dict(GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=bd, TILE=cfg.tile, SOFTCAP=softcap is not None, LOWP=lowp,
                  PRECISION=precision, num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages)
    kn.dkdv_kernel[(Hkv, sched.shape[1])](
        q, k, v, dout, dk, dv, lse, delta, sched[1], T, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
        *dout.stride()[:2], *dk.stride()[:2], *dv.stride()[:2], scale, qk_scale, cap, w,
        BLOCK_M=cfg.kv_m, **common)
    kn.dq_kernel[(Hq, sched.shape[1])](
        q, k, v, dout, dq, lse, delta, sched[0], T, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
        *dout.stride()[:2], *dq.stride()[:2], scale, qk_scale, cap, w, BLOCK_N=cfg.dq_n, **common)
    return dq, dk, dv
