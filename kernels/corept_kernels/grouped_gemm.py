"""Grouped (per-expert) GEMMs for mixture-of-experts layers: Triton kernels and their launches.

Rows are sorted by expert and ``offsets`` ``[E]`` int32 holds cumulative *end* offsets
(``offsets[e]`` = rows of experts ``0..e``; the convention of ``torch._grouped_mm``'s ``offs``);
expert ``e`` owns rows ``offsets[e-1]:offsets[e]`` (``0:offsets[0]`` for ``e = 0``), possibly none,
and ``offsets[-1]`` must equal the row count (not checked: that would cost a host sync).
Two forms, each one launch over all experts with fp32 accumulation:

* :func:`rows_mm` (ragged rows): ``out[rows_e] = alpha * a[rows_e] @ b[e] (+ beta * a2[rows_e] @
  b2[e]) (+ bias[e])``, ``a [N, k]``, ``b [E, k, n]`` -> ``[N, n]``. Programs are (row tile, column
  tile); a row tile finds its expert from ``offsets`` inside the kernel (a prefix sum of per-expert
  tile counts), so the grid ``cdiv(N, BM) + E`` needs no host sync; tiles past the last are idle.
* :func:`ragged_mm` (ragged contraction): ``out[e] = alpha * p[rows_e]^T @ q[rows_e]``, ``p [N, m]``,
  ``q [N, n]`` -> ``[E, m, n]`` (weight gradients); an expert without rows gets zeros.

Each call takes ``torch._grouped_mm`` instead where it has its fast (CUTLASS) path: bf16 operands on
compute capability 9.x/10.x, fewer than 1024 experts, 16-byte aligned pointers and strides, and a
one-time probe on the device (:func:`torch_grouped_mm_ok`) found it right, empty experts included.
fp16 has no fast path there (it loops over experts with a host sync), so it stays on Triton.
Operands are read through their strides (transposes are free). Under the interpreter, and for fp32,
matmul operands are fp32 (the interpreter's bf16 arithmetic is wrong) at ``ieee`` precision.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from corept_kernels.capabilities import interpreter_active
from corept_kernels.rounding import store_rounded

#: False: every GEMM runs the Triton kernels (tests, benchmarks comparing the two).
TORCH_GROUPED_MM = True

#: ``(BM, BN, BK)`` used off CUDA (the interpreter) when set: tests set small blocks to cover several
#: tiles per expert and several contraction steps at small shapes.
BLOCKS_OFF_CUDA: tuple[int, int, int] | None = None

# Tests set this to True: every buffer a kernel must fill starts as NaN, so unwritten elements show.
POISON_OUTPUTS = False

_MAX_GROUPS = 1024  # torch._grouped_mm's CUTLASS path takes fewer groups


def _empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


@triton.jit
def _tile_of_expert(OFFS, pid, E: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr):
    """``(expert, first row, end row)`` of row tile ``pid`` (``BM`` rows of one expert), or an
    expert of ``-1`` for a tile past the last."""
    idx = tl.arange(0, EP)
    ends = tl.load(OFFS + idx, mask=idx < E, other=0)
    starts = tl.load(OFFS + idx - 1, mask=(idx > 0) & (idx < E), other=0)
    tiles = (ends - starts + BM - 1) // BM
    cum = tl.cumsum(tiles, 0)
    e = tl.sum((cum <= pid).to(tl.int32))
    sel = idx == e
    first_tile = tl.sum(tl.where(sel, cum - tiles, 0))
    row0 = tl.sum(tl.where(sel, starts, 0)) + (pid - first_tile) * BM
    end = tl.sum(tl.where(sel, ends, 0))
    return tl.where(pid < tl.sum(tiles), e, -1), row0, end


@triton.jit
def _rows_loop(acc, A, B, rows, rmask, cols, cmask, e, K, sa_m, sa_k, sb_e, sb_k, sb_n,
               LOWP: tl.constexpr, PRECISION: tl.constexpr, BK: tl.constexpr):
    """``acc += A[rows] @ B[e]`` over the contraction length ``K``."""
    b_base = B + e.to(tl.int64) * sb_e
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        a = tl.load(A + rows[:, None] * sa_m + ks[None, :] * sa_k, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_base + ks[:, None] * sb_k + cols[None, :] * sb_n, mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        if not LOWP:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _rows_kernel(A, B, A2, B2, BIAS, C, OFFS, n, K, K2, sa_m, sa_k, sb_e, sb_k, sb_n, sa2_m, sa2_k, sb2_e,
                 sb2_k, sb2_n, sbias_e, sbias_n, sc_m, sc_n, alpha_over_beta, beta, E: tl.constexpr,
                 EP: tl.constexpr, HAS_2: tl.constexpr, HAS_BIAS: tl.constexpr, LOWP: tl.constexpr,
                 PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    e, row0, end = _tile_of_expert(OFFS, tl.program_id(0), E, EP, BM)
    if e < 0:
        return
    rows = (row0 + tl.arange(0, BM)).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    rmask, cmask = rows < end, cols < n
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _rows_loop(acc, A, B, rows, rmask, cols, cmask, e, K, sa_m, sa_k, sb_e, sb_k, sb_n, LOWP, PRECISION, BK)
    # one accumulator for both products: alpha * P1 + beta * P2 = beta * (alpha / beta * P1 + P2)
    acc = acc * alpha_over_beta
    if HAS_2:
        acc = _rows_loop(acc, A2, B2, rows, rmask, cols, cmask, e, K2, sa2_m, sa2_k, sb2_e, sb2_k, sb2_n, LOWP,
                         PRECISION, BK)
    acc = acc * beta
    if HAS_BIAS:
        acc += tl.load(BIAS + e.to(tl.int64) * sbias_e + cols * sbias_n, mask=cmask, other=0.0).to(tl.float32)[None, :]
    store_rounded(C + rows[:, None] * sc_m + cols[None, :] * sc_n, acc, rmask[:, None] & cmask[None, :])


@triton.jit
def _ragged_kernel(P, Q, C, OFFS, m, n, sp_r, sp_m, sq_r, sq_n, sc_e, sc_m, sc_n, alpha, LOWP: tl.constexpr,
                   PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    e = tl.program_id(0)
    tiles_n = tl.cdiv(n, BN)
    ms = (tl.program_id(1) // tiles_n).to(tl.int64) * BM + tl.arange(0, BM)
    ns = (tl.program_id(1) % tiles_n).to(tl.int64) * BN + tl.arange(0, BN)
    mmask, nmask = ms < m, ns < n
    end = tl.load(OFFS + e)
    start = tl.load(OFFS + e - 1, mask=e > 0, other=0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(start, end, BK):
        rs = (r0 + tl.arange(0, BK)).to(tl.int64)
        rmask = rs < end
        pt = tl.load(P + rs[None, :] * sp_r + ms[:, None] * sp_m, mask=mmask[:, None] & rmask[None, :], other=0.0)
        q = tl.load(Q + rs[:, None] * sq_r + ns[None, :] * sq_n, mask=rmask[:, None] & nmask[None, :], other=0.0)
        if not LOWP:
            pt, q = pt.to(tl.float32), q.to(tl.float32)
        acc = tl.dot(pt, q, acc, input_precision=PRECISION)
    store_rounded(C + e.to(tl.int64) * sc_e + ms[:, None] * sc_m + ns[None, :] * sc_n, acc * alpha,
                  mmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------- launches


def _lowp(t: torch.Tensor) -> tuple[bool, str]:
    """(LOWP, PRECISION): 16-bit matmul operands on a GPU; fp32 operands get full fp32 matmuls."""
    lowp = t.dtype != torch.float32 and t.is_cuda and not interpreter_active()
    return lowp, "tf32" if lowp else "ieee"


def _blocks(device: torch.device, lowp: bool, n: int) -> tuple[int, int, int, int, int]:
    """``(BM, BN, BK, num_warps, num_stages)``; ``n`` the output width. Not tuned on a GPU yet."""
    if BLOCKS_OFF_CUDA is not None and (device.type != "cuda" or interpreter_active()):
        return (*BLOCKS_OFF_CUDA, 4, 1)
    bn = 128 if lowp and n > 64 else 64
    return (64, bn, 64 if lowp else 32, 4, 3 if lowp else 2)


def _fit(block: int, size: int) -> int:
    """A power-of-two block no wider than needed for ``size`` (``tl.dot`` takes 16 at least)."""
    return max(16, min(block, triton.next_power_of_2(max(size, 1))))


def _rows_triton(a, b, offsets, alpha, a2, b2, beta, bias):
    N, K = a.shape
    E, _, n = b.shape
    lowp, precision = _lowp(a)
    bm, bn, bk, warps, stages = _blocks(a.device, lowp, n)
    bn = _fit(bn, n)
    bk = _fit(bk, max(K, a2.shape[1] if a2 is not None else 1))
    out = _empty((N, n), a.dtype, a.device)
    has2 = a2 is not None and beta != 0.0
    if not has2:
        a2, b2, beta = a, b, 1.0
    dummy = a  # stands in for absent tensors (never read)
    bias_t = bias if bias is not None else dummy
    sbias = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    grid = (triton.cdiv(N, bm) + E, triton.cdiv(n, bn))
    _rows_kernel[grid](
        a, b, a2, b2, bias_t, out, offsets, n, K, a2.shape[1], a.stride(0), a.stride(1), *b.stride(),
        a2.stride(0), a2.stride(1), *b2.stride(), *sbias, out.stride(0), out.stride(1),
        float(alpha) / float(beta), float(beta), E=E, EP=max(16, triton.next_power_of_2(E)), HAS_2=has2,
        HAS_BIAS=bias is not None, LOWP=lowp, PRECISION=precision, BM=bm, BN=bn, BK=bk, num_warps=warps,
        num_stages=stages)
    return out


def _ragged_triton(p, q, offsets, alpha):
    m, n, E = p.shape[1], q.shape[1], offsets.shape[0]
    lowp, precision = _lowp(p)
    bm, bn, bk, warps, stages = _blocks(p.device, lowp, n)
    bm, bn = _fit(bm, m), _fit(bn, n)
    out = _empty((E, m, n), p.dtype, p.device)
    grid = (E, triton.cdiv(m, bm) * triton.cdiv(n, bn))
    _ragged_kernel[grid](p, q, out, offsets, m, n, p.stride(0), p.stride(1), q.stride(0), q.stride(1),
                         *out.stride(), float(alpha), LOWP=lowp, PRECISION=precision, BM=bm, BN=bn, BK=bk,
                         num_warps=warps, num_stages=stages)
    return out


def rows_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, *, alpha: float = 1.0,
            a2: torch.Tensor | None = None, b2: torch.Tensor | None = None, beta: float = 1.0,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per expert ``e``: ``out[rows_e] = alpha * a[rows_e] @ b[e] + beta * a2[rows_e] @ b2[e] + bias[e]``.

    :param a: ``[N, k]``, rows sorted by expert. :param b: ``[E, k, n]``.
    :param offsets: ``[E]`` int32 cumulative end offsets, ``offsets[-1] == N``.
    :param a2: optional ``[N, k2]`` with ``b2`` ``[E, k2, n]`` (the LoRA up-projection).
    :param bias: optional ``[E, n]``.
    :returns: ``[N, n]`` in ``a``'s dtype, contiguous.
    """
    has2 = a2 is not None and beta != 0.0
    if _gm_rows_ok(a, b):
        out = torch._grouped_mm(a, b, offs=offsets)
        if alpha != 1.0:
            out = out * alpha
        if has2:
            t = torch._grouped_mm(a2, b2, offs=offsets) if _gm_rows_ok(a2, b2) else None
            out = out.add_(t, alpha=beta) if t is not None else out.add_(_rows_triton(a2, b2, offsets, beta,
                                                                                      None, None, 0.0, None))
        if bias is not None:
            out = out.add_(bias.index_select(0, expert_of_rows(offsets, a.shape[0])))
        return out.contiguous()
    return _rows_triton(a, b, offsets, alpha, a2, b2, beta, bias)


def ragged_mm(p: torch.Tensor, q: torch.Tensor, offsets: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """Per expert ``e``: ``out[e] = alpha * p[rows_e]^T @ q[rows_e]`` (zeros for an expert without rows).

    :param p: ``[N, m]``. :param q: ``[N, n]`` (a stride-0 column of ones gives row sums of ``p``).
    :returns: ``[E, m, n]`` in ``p``'s dtype, contiguous.
    """
    if _gm_ragged_ok(p, q, offsets.shape[0]):
        out = torch._grouped_mm(p.t(), q, offs=offsets)
        return (out * alpha if alpha != 1.0 else out).contiguous()
    return _ragged_triton(p, q, offsets, alpha)


def expert_of_rows(offsets: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``[n_rows]`` int64: the expert of each row (without a host sync)."""
    rows = torch.arange(n_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, rows, right=True).clamp_(max=offsets.shape[0] - 1)


# ----------------------------------------------------------------------------- torch._grouped_mm


_PROBED: dict[int, bool] = {}


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _row_major(t: torch.Tensor) -> bool:
    """Unit stride along the last dim and a 16-byte multiple row stride (bf16: 8 elements)."""
    return t.stride(-1) == 1 and t.stride(-2) % 8 == 0 and t.stride(-2) >= max(1, t.shape[-1])


def _col_major(t: torch.Tensor) -> bool:
    return t.stride(-2) == 1 and t.stride(-1) % 8 == 0 and t.stride(-1) >= max(1, t.shape[-2])


def _gm_rows_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    # ragged rows of ``a``: a group starts at ``start * stride(0)``, aligned only when row major
    return (a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 and b.shape[0] < _MAX_GROUPS
            and _row_major(a) and _aligned(a) and (_row_major(b) or _col_major(b)) and b.stride(0) % 8 == 0
            and _aligned(b) and torch_grouped_mm_ok(a.device))


def _gm_ragged_ok(p: torch.Tensor, q: torch.Tensor, groups: int) -> bool:
    # the contraction is ragged: both operands advance ``stride(0)`` per row, so both row major
    return (p.dtype == torch.bfloat16 and q.dtype == torch.bfloat16 and groups < _MAX_GROUPS and _row_major(p)
            and _row_major(q) and _aligned(p) and _aligned(q) and torch_grouped_mm_ok(p.device))


def torch_grouped_mm_ok(device: torch.device) -> bool:
    """Whether ``torch._grouped_mm``'s fast path runs right on ``device`` (probed once per device)."""
    if not TORCH_GROUPED_MM or device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROBED:
        _PROBED[index] = _probe(torch.device("cuda", index))
    return _PROBED[index]


def _probe(device: torch.device) -> bool:
    """Both forms on bf16 with an empty expert and unaligned group starts, against fp32 matmuls."""
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return False
    gen = torch.Generator().manual_seed(0)
    bounds = [0, 5, 5, 29, 40]
    offs = torch.tensor(bounds[1:], dtype=torch.int32, device=device)
    # device="cpu": the generator is a CPU one, also under a caller's ``with torch.device("cuda")``
    x, dy = (torch.randn(40, d, generator=gen, device="cpu").to(device, torch.bfloat16) for d in (32, 24))
    w = torch.randn(4, 24, 32, generator=gen, device="cpu").to(device, torch.bfloat16)
    try:
        with torch.no_grad(), torch.autocast("cuda", enabled=False):
            got = [torch._grouped_mm(x, w.transpose(1, 2), offs=offs), torch._grouped_mm(dy, w, offs=offs),
                   torch._grouped_mm(dy.t(), x, offs=offs)]
            seg = [slice(bounds[i], bounds[i + 1]) for i in range(4)]
            want = [torch.cat([x[s].float() @ w[i].float().t() for i, s in enumerate(seg)]),
                    torch.cat([dy[s].float() @ w[i].float() for i, s in enumerate(seg)]),
                    torch.stack([dy[s].float().t() @ x[s].float() for s in seg])]
            close = all(bool(torch.isfinite(g).all()) and (g.float() - t).abs().max().item()
                        <= 0.02 * t.abs().max().item() for g, t in zip(got, want))
            return close and not got[2][1].any().item()  # the empty expert's weight gradient: zeros
    except RuntimeError:
        return False
