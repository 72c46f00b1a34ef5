"""``y += s * (u @ v)`` for a low-rank fp32 product, in place on a bf16/fp16 ``y``: one Triton kernel.

The fused LoRA paths add the adapter branch ``s * xa B^T`` to the base output and the branch's
input gradient ``dxa A`` to ``dx``. With fp32 adapters on a bf16 model peft forms these products in
fp32 and rounds them where :mod:`corept_kernels.lora.autograd` says. Here each output tile sums its
``r`` outer products in fp32 registers (the inner dimension is the LoRA rank: one fp32-accurate
``tl.dot`` per 64-wide slice of the rank, see ``DOT_PRECISION``) and rounds to nearest-even
once, or twice where peft rounds the branch before the add (``round_first``: 4-bit bases, and
``dx``). So the only traffic is reading and writing ``y``: no
``[N, out]`` fp32 product, no extra launches for casts (the torch form took about ten per call).

Shapes: ``y`` ``[M, N]`` (unit column stride), ``u`` ``[M, R]``, ``v`` ``[R, N]`` (any strides), fp32.

Registered as the kernel ``"rank_add"``: a list of such adds of one row count, in one launch per
three (:func:`rank_add_group_triton_`), with the same fp32 math in torch as its twin
(:func:`rank_add_group_torch_`), chosen per call by :func:`corept_kernels.capabilities.dispatch`.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from corept_kernels.capabilities import KernelInfo, register, unsupported_tensors
from corept_kernels.lora.chunks import product_rows
from corept_kernels.rounding import rounded, store_rounded

try:  # the base of Triton's compile, resource and ptxas errors
    from triton.errors import TritonError as _BuildError
except ImportError:  # pragma: no cover - older layouts
    from triton.compiler.errors import CompilationError as _BuildError

logger = logging.getLogger(__name__)

BLOCK_M, BLOCK_N, NUM_WARPS = 64, 64, 4
"""Tile and warps of every launch (module constants so ``bench/lora_branch_probe.py`` can sweep them).
Chosen with the dot precision and the factor load below from the H200 sweep of 10 tiles x 2 load
forms x 2 precisions (bench/results/lora-branch-probe-2026-11-29-h200-s6-precision.jsonl, 4096 rows,
r 16): 64x64 at 4 warps, tf32x3, direct load took 0.076 ms at width 4096 and 0.144 ms at 14336,
against 0.092 and 0.227 ms for the previous setting (64x128, 4 warps, ieee, rows-then-transpose
from width 8192); no other setting was faster at both widths."""

DOT_PRECISION = "tf32x3"
"""``tl.dot``'s ``input_precision`` for the fp32 factors on CUDA: ``"tf32x3"`` (three TF32
tensor-core products per term, ~2^-21 relative error: below the 2^-16 the split ``u`` factors
already carry) or ``"ieee"`` (fp32 FMAs, 1.2-1.6x slower in the sweep above).
``kernels/tests/lora/test_branch.py::test_cuda_rank_add_dot_precisions_round_like_fp32`` holds both
to the fp32 reference's ulp bound on CUDA; the interpreter computes every form in fp32."""

TRANSPOSED_V_MIN_N: int | None = None
"""From this output width ``N`` up, a ``v`` whose rank dimension is the contiguous one (``B.t()``,
the forward's branch) is loaded as ``[BLOCK_N, BLOCK_R]`` rows of ``B`` and transposed in registers
(each row one contiguous ``r``-float run) instead of ``[BLOCK_R, BLOCK_N]`` directly (every float
from a different ``r``-strided place); ``None``: never. The values, and so the results, are the
same either way. With the fp32 FMA dot it paid at width 14336 (0.210 vs 0.230 ms) and lost at 4096
(0.111 vs 0.080; lora-branch-probe-2026-11-29-h200-s6-rankadd.jsonl); with the setting above the
direct load was faster at both widths (0.144 vs 0.237 ms at 14336)."""


@triton.jit
def _tile(Y, U, V, pid_n, M, N, R, sy, su0, su1, sv0, sv1, scaling, ROUND_FIRST: tl.constexpr,
          V_BY_ROWS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_R: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``y``: row block ``program_id(0)``, column block ``pid_n``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_R):
        ks = k0 + tl.arange(0, BLOCK_R)
        kmask = ks < R
        u = tl.load(U + rows[:, None] * su0 + ks[None, :] * su1, mask=rmask[:, None] & kmask[None, :], other=0.0)
        if V_BY_ROWS:  # v[k, c] at V + k * sv0 + c * sv1 with sv0 == 1: load rows of v^T, transpose
            vt = tl.load(V + cols[:, None] * sv1 + ks[None, :] * sv0, mask=cmask[:, None] & kmask[None, :], other=0.0)
            v = tl.trans(vt)
        else:
            v = tl.load(V + ks[:, None] * sv0 + cols[None, :] * sv1, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(u, v, acc, input_precision=PRECISION)
    z = acc * scaling
    if ROUND_FIRST:
        z = rounded(z, Y.dtype.element_ty)
    ptrs = Y + rows[:, None] * sy + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # after the dot: loading it first measured 30% slower
    store_rounded(ptrs, y + z, mask)


@triton.jit
def _rank_add_kernel(Y, U, V, M, N, R, sy, su0, su1, sv0, sv1, scaling, ROUND_FIRST: tl.constexpr,
                     V_BY_ROWS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    _tile(Y, U, V, tl.program_id(1), M, N, R, sy, su0, su1, sv0, sv1, scaling, ROUND_FIRST, V_BY_ROWS, PRECISION,
          BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _rank_add_group_kernel(Y0, U0, V0, N0, R0, sy0, su00, su10, sv00, sv10, s0,
                           Y1, U1, V1, N1, R1, sy1, su01, su11, sv01, sv11, s1,
                           Y2, U2, V2, N2, R2, sy2, su02, su12, sv02, sv12, s2,
                           M, NB0, NB1, ROUND_FIRST: tl.constexpr, V_BY_ROWS: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    """Up to three rank-adds sharing the row count ``M`` in one launch: the grid's column blocks
    are slot 0's ``NB0``, then slot 1's ``NB1``, then slot 2's."""
    pid_n = tl.program_id(1)
    if pid_n < NB0:
        _tile(Y0, U0, V0, pid_n, M, N0, R0, sy0, su00, su10, sv00, sv10, s0, ROUND_FIRST, V_BY_ROWS, PRECISION,
              BLOCK_M, BLOCK_N, BLOCK_R)
    elif pid_n < NB0 + NB1:
        _tile(Y1, U1, V1, pid_n - NB0, M, N1, R1, sy1, su01, su11, sv01, sv11, s1, ROUND_FIRST, V_BY_ROWS,
              PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    else:
        _tile(Y2, U2, V2, pid_n - NB0 - NB1, M, N2, R2, sy2, su02, su12, sv02, sv12, s2, ROUND_FIRST, V_BY_ROWS,
              PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)


def _by_rows(v: torch.Tensor) -> bool:
    return TRANSPOSED_V_MIN_N is not None and v.shape[1] >= TRANSPOSED_V_MIN_N and v.stride(0) == 1 and v.shape[0] > 1


def _check(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    M, N = y.shape
    if u.shape != (M, v.shape[0]) or v.shape[1] != N or y.stride(1) != 1:
        raise ValueError(f"rank_add: y {tuple(y.shape)} (strides {y.stride()}), u {tuple(u.shape)}, "
                         f"v {tuple(v.shape)}: need y [M, N] with unit column stride, u [M, R], v [R, N]")


def _block_r(ranks) -> int:
    return min(64, max(16, triton.next_power_of_2(max(ranks))))


def rank_add_triton_(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scaling: float,
                     round_first: bool) -> torch.Tensor:
    """``y <- round(y + round?(scaling * (u @ v)))`` in place through the kernel; returns ``y``.

    :param y: ``[M, N]`` bf16/fp16 with unit column stride, on a device Triton can launch on
        (CUDA, or CPU under the interpreter: :func:`corept_kernels.capabilities.dispatch`).
    :param u: ``[M, R]`` fp32. :param v: ``[R, N]`` fp32 (views with any strides, e.g. ``B.t()``).
    :param round_first: round the product to ``y``'s dtype before the add (peft's 4-bit branch and
        autograd's accumulation of the branch's input gradient); else one rounding of the sum.
    """
    _check(y, u, v)
    M, N = y.shape
    if M == 0 or N == 0:
        return y
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _rank_add_kernel[grid](y, u, v, M, N, u.shape[1], y.stride(0), u.stride(0), u.stride(1), v.stride(0),
                           v.stride(1), float(scaling), ROUND_FIRST=round_first,
                           V_BY_ROWS=_by_rows(v), PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M,
                           BLOCK_N=BLOCK_N, BLOCK_R=_block_r([u.shape[1]]), num_warps=NUM_WARPS)
    return y


GROUP_LAUNCH_FAILED: str | None = None
"""Why the group kernel could not be built on this machine (then each add launches alone, as
before the group kernel existed); ``None`` while it works."""


def _check_group(items) -> list:
    """The non-empty ``items``, checked to be adds of one row count and output dtype."""
    items = [it for it in items if it[0].numel() > 0]
    for y, u, v, _ in items:
        _check(y, u, v)
    if len({y.shape[0] for y, *_ in items}) > 1 or len({y.dtype for y, *_ in items}) > 1:
        raise ValueError("rank_add group: the outputs must share their row count and dtype")
    return items


def rank_add_group_triton_(items, round_first: bool) -> None:
    """Several rank-adds ``(y_i, u_i, v_i, scaling_i)`` of one row count, each exactly as
    :func:`rank_add_triton_` does it, in one launch per three (the q/k/v or gate/up outputs of a
    shared input: one Python launch instead of three, the host's cost of a Triton launch being
    several times an aten op's). The ``y_i`` share a dtype; ranks and widths may differ."""
    items = _check_group(items)
    by_rows = {_by_rows(v) for _, _, v, _ in items}
    if len(items) <= 1 or len(by_rows) > 1 or GROUP_LAUNCH_FAILED is not None:
        for y, u, v, s in items:
            rank_add_triton_(y, u, v, s, round_first)
        return
    for start in range(0, len(items), 3):
        part = items[start:start + 3]
        nbs = [triton.cdiv(y.shape[1], BLOCK_N) for y, *_ in part]
        slots = []
        for y, u, v, s in part + [part[-1]] * (3 - len(part)):  # unused slots: never reached by the grid
            slots += [y, u, v, y.shape[1], u.shape[1], y.stride(0), u.stride(0), u.stride(1), v.stride(0),
                      v.stride(1), float(s)]
        M = part[0][0].shape[0]
        grid = (triton.cdiv(M, BLOCK_M), sum(nbs))
        try:  # a build failure raises before anything runs: nothing was written yet
            _rank_add_group_kernel[grid](*slots, M, nbs[0], nbs[1] if len(nbs) > 1 else 0, ROUND_FIRST=round_first,
                                         V_BY_ROWS=next(iter(by_rows)), PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M,
                                         BLOCK_N=BLOCK_N, BLOCK_R=_block_r([u.shape[1] for _, u, _, _ in part]),
                                         num_warps=NUM_WARPS)
        except _BuildError as exc:
            _group_failed(exc)
            for y, u, v, s in part:
                rank_add_triton_(y, u, v, s, round_first)


def _group_failed(exc: BaseException) -> None:
    global GROUP_LAUNCH_FAILED
    GROUP_LAUNCH_FAILED = f"{type(exc).__name__}: {str(exc)[:300]}"
    logger.warning("corept: the grouped rank-add kernel could not be built (%s); the branches of a "
                   "q/k/v or gate/up group are added one launch each from now on", GROUP_LAUNCH_FAILED)


def rank_add_group_torch_(items, round_first: bool) -> None:
    """The twin of :func:`rank_add_group_triton_`: each add's fp32 product formed by torch over row
    chunks of at most :data:`~corept_kernels.lora.chunks.CHUNK_BYTES`, rounded at the same points."""
    for y, u, v, scaling in _check_group(items):
        for sl in product_rows(y.shape[0], y.shape[1], 4):
            z = u[sl] @ v
            if scaling != 1.0:
                z.mul_(scaling)
            if round_first:
                y[sl] += z.to(y.dtype)
            else:
                y[sl] = z.add_(y[sl]).to(y.dtype)


def _rank_add_group_compiled_(items, round_first: bool) -> None:
    items = _check_group(items)
    if items:
        ys, us, vs, ss = (list(t) for t in zip(*items))
        torch.ops.corept_kernels.rank_add_(ys, us, vs, [float(s) for s in ss], round_first)


register(KernelInfo(
    name="rank_add", triton_fn=rank_add_group_triton_, reference_fn=rank_add_group_torch_,
    compiled_fn=_rank_add_group_compiled_, has_backward=False, devices=("cuda",), eligibility=unsupported_tensors,
    notes="inside the fused LoRA paths (fp32 adapters on bf16): y += s * (u @ v) in place, fp32 sums "
          "rounded once (or twice, round_first); up to three adds per launch; not differentiable"))
