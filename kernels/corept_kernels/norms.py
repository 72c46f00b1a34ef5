"""RMSNorm and LayerNorm over the last dimension: Triton forward and backward.

Forward: one program normalises ``ROWS`` rows of ``[M, H]`` (several rows only when ``H`` is
small), the whole row in registers (``BLOCK_H = next_power_of_2(H)``), statistics in fp32.
Backward: a persistent-style grid of ``G`` programs; each walks a contiguous range of rows, writes
``dX`` for them and keeps its share of ``dW`` (and ``dB``) in fp32 registers, stored once as a
partial row ``[G, H]`` that a small torch sum reduces. Nothing is written in place: ``dX`` goes to a
fresh buffer, so norms chained with residuals (e.g. Gemma-2's pre/post norms) keep correct gradients.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from corept_kernels import capabilities
from corept_kernels.capabilities import KernelInfo, unsupported_tensors
from corept_kernels.torch_ref import norms as ref
from corept_kernels.torch_ref.norms import CASTING_MODES, rms_norm_out_dtype
from corept_kernels.tuning import Launcher, sm_count

_CASTING_ID = {"scale_after_cast": 0, "scale_in_fp32": 1, "none": 2}
MAX_H = 65536  # beyond this a row no longer fits in registers; the torch twin takes over

# Tests set this to True: every buffer a kernel must fill starts as NaN, so unwritten elements show.
POISON_OUTPUTS = False


def _empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, M, H, stride_x, stride_y, eps, offset,
                    CASTING: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < M
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)
    n = x * rstd[:, None]
    if CASTING == 0:  # scale_after_cast: the normalised row is rounded to x's dtype before the multiply
        n = n.to(X.dtype.element_ty).to(tl.float32)
    y = n * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, M, H, stride_dy, stride_x, stride_dx, offset,
                    CASTING: tl.constexpr, COMPUTE_DW: tl.constexpr,
                    BLOCK_H: tl.constexpr, ROWS: tl.constexpr, PER_SM: tl.constexpr):
    pid = tl.program_id(0)
    # contiguous ranges of whole ROWS-blocks, one per program: they never overlap
    rows_per_prog = tl.cdiv(tl.cdiv(M, ROWS), tl.num_programs(0)) * ROWS
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    start = pid * rows_per_prog
    for i in range(0, rows_per_prog, ROWS):
        rows = start + i + tl.arange(0, ROWS)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        n = x * rstd[:, None]
        dn = dy * w[None, :]
        if COMPUTE_DW:
            if CASTING == 0:
                dw += tl.sum(dy * n.to(X.dtype.element_ty).to(tl.float32), axis=0)
            else:
                dw += tl.sum(dy * n, axis=0)
        # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n))
        c = tl.sum(dn * n, axis=1) / H
        dx = rstd[:, None] * (dn - n * c[:, None])
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * H + cols, dw, mask=cmask)


@triton.jit
def _ln_fwd_kernel(X, W, B, Y, MEAN, RSTD, M, H, stride_x, stride_y, eps,
                   HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < M
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / H
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / H + eps)
    y = xc * rstd[:, None] * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, M, H, stride_dy, stride_x, stride_dx,
                   COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                   BLOCK_H: tl.constexpr, ROWS: tl.constexpr, PER_SM: tl.constexpr):
    pid = tl.program_id(0)
    rows_per_prog = tl.cdiv(tl.cdiv(M, ROWS), tl.num_programs(0)) * ROWS
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    db = tl.zeros([BLOCK_H], dtype=tl.float32)
    start = pid * rows_per_prog
    for i in range(0, rows_per_prog, ROWS):
        rows = start + i + tl.arange(0, ROWS)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / H
        c2 = tl.sum(g, axis=1) / H
        dx = rstd[:, None] * (g - xhat * c1[:, None] - c2[:, None])
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DB:
            db += tl.sum(dy, axis=0)
    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * H + cols, dw, mask=cmask)
    if COMPUTE_DB:
        tl.store(DB_PART + pid.to(tl.int64) * H + cols, db, mask=cmask)


def _config(H: int) -> tuple[int, int, int]:
    """(BLOCK_H, ROWS, default num_warps): about 2k elements per program for small H, one row
    otherwise. The default warps serve off CUDA; on CUDA :data:`_LAUNCH` tunes them."""
    block = triton.next_power_of_2(H)
    rows = max(1, min(16, 2048 // block))
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return block, rows, warps


def _warp_choices(H: int) -> list[int]:
    tile = triton.next_power_of_2(H) * _config(H)[1]
    return [w for w in (4, 8, 16) if w * 32 <= tile] or [4]


#: Backward programs per SM tried on CUDA. Off CUDA the grid is :data:`_OFF_CUDA_PROGRAMS` programs.
_PER_SM_CHOICES = (1, 2, 4, 8)
_OFF_CUDA_PROGRAMS = 4


def _fwd_configs():
    return [triton.Config({}, num_warps=w) for w in (4, 8, 16)]


def _bwd_configs():
    return [triton.Config({"PER_SM": p}, num_warps=w) for p in _PER_SM_CHOICES for w in (4, 8, 16)]


def _prune_warps(configs, nargs, **kwargs):
    ok = set(_warp_choices(nargs["H"]))
    kept = [c for c in configs if c.num_warps in ok]
    return kept or configs[:1]


def _launcher(kernel, configs, key, **default_meta) -> Launcher:
    return Launcher(kernel, configs, triton.Config(default_meta, num_warps=8), key, prune=_prune_warps)


_LAUNCH = {
    "rms_fwd": _launcher(_rms_fwd_kernel, _fwd_configs(), ["H"]),
    "rms_bwd": _launcher(_rms_bwd_kernel, _bwd_configs(), ["H", "COMPUTE_DW"], PER_SM=2),
    "ln_fwd": _launcher(_ln_fwd_kernel, _fwd_configs(), ["H"]),
    "ln_bwd": _launcher(_ln_bwd_kernel, _bwd_configs(), ["H", "COMPUTE_DW", "COMPUTE_DB"], PER_SM=2),
}


def _launch(name: str, grid, device: torch.device, H: int, *args, **constexprs) -> int:
    """Run one norm kernel (tuned on CUDA; off CUDA with the default warps for ``H``).

    :returns: the number of programs the writing launch ran (backward: partial rows written).
    """
    meta = _LAUNCH[name](grid, device, *args, default_warps=_config(H)[2], **constexprs)
    return grid(meta)[0]


def _bwd_programs(M: int, rows: int, device: torch.device) -> tuple[Callable, int]:
    """(grid function, most programs any config launches) for a backward over ``M`` rows.

    A program walks a contiguous range of rows and keeps its dW/dB share in fp32 registers, so
    programs per SM trade latency hiding against partial rows to reduce; the tuner picks.
    """
    blocks = triton.cdiv(M, rows)
    if device.type != "cuda":
        n = min(blocks, _OFF_CUDA_PROGRAMS)
        return (lambda meta: (n,)), n
    sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return (lambda meta: (min(blocks, meta["PER_SM"] * sms),)), min(blocks, max(_PER_SM_CHOICES) * sms)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[M, H]`` with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _rms_forward(x, weight, eps: float, offset: float, casting: str):
    """``(y [M, H], rstd [M] fp32)`` for ``x`` ``[..., H]`` (``x`` read as rows, no copy when it can)."""
    H = x.shape[-1]
    x2 = _rows(x)
    weight = weight.contiguous()
    M = x2.shape[0]
    y = _empty((M, H), rms_norm_out_dtype(x, weight, casting), x.device)
    rstd = _empty((M,), torch.float32, x.device)
    block, rows, _ = _config(H)
    _launch("rms_fwd", lambda meta: (triton.cdiv(M, rows),), x.device, H,
            x2, weight, y, rstd, M, H, x2.stride(0), y.stride(0), eps, offset,
            CASTING=_CASTING_ID[casting], BLOCK_H=block, ROWS=rows)
    return y, rstd


def _rms_backward(dy, x, weight, rstd, offset: float, casting: str, need_dw: bool):
    """``(dx [M, H] in x's dtype, dw [H] or None)`` from ``dy`` ``[..., H]``."""
    x2, dy2 = _rows(x), _rows(dy)
    weight = weight.contiguous()
    M, H = x2.shape
    dx = _empty((M, H), x2.dtype, x2.device)
    block, rows, _ = _config(H)
    grid, most = _bwd_programs(M, rows, x2.device)
    dw_part = _empty((most, H), torch.float32, x2.device) if need_dw else dx
    # the tuned config may launch fewer programs than the buffer has rows: sum what it wrote
    n = _launch("rms_bwd", grid, x2.device, H,
                dy2, x2, weight, rstd, dx, dw_part, M, H, dy2.stride(0), x2.stride(0), dx.stride(0),
                offset, CASTING=_CASTING_ID[casting], COMPUTE_DW=need_dw, BLOCK_H=block, ROWS=rows)
    return dx, (dw_part[:n].sum(0).to(weight.dtype) if need_dw else None)


def _ln_forward(x, weight, bias, eps: float):
    """``(y [M, H], mean [M], rstd [M])`` (statistics fp32) for ``x`` ``[..., H]``."""
    H = x.shape[-1]
    x2 = _rows(x)
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    M = x2.shape[0]
    y = _empty((M, H), x.dtype, x.device)
    mean = _empty((M,), torch.float32, x.device)
    rstd = _empty((M,), torch.float32, x.device)
    block, rows, _ = _config(H)
    _launch("ln_fwd", lambda meta: (triton.cdiv(M, rows),), x.device, H,
            x2, weight, bias if bias is not None else weight, y, mean, rstd, M, H,
            x2.stride(0), y.stride(0), eps, HAS_BIAS=bias is not None, BLOCK_H=block, ROWS=rows)
    return y, mean, rstd


def _ln_backward(dy, x, weight, mean, rstd, need_dw: bool, bias_dtype):
    """``(dx [M, H], dw [H] or None, db [H] or None)``; ``bias_dtype`` None: no bias gradient."""
    x2, dy2 = _rows(x), _rows(dy)
    M, H = x2.shape
    dx = _empty((M, H), x2.dtype, x2.device)
    block, rows, _ = _config(H)
    grid, most = _bwd_programs(M, rows, x2.device)
    need_db = bias_dtype is not None
    dw_part = _empty((most, H), torch.float32, x2.device) if need_dw else dx
    db_part = _empty((most, H), torch.float32, x2.device) if need_db else dx
    n = _launch("ln_bwd", grid, x2.device, H,
                dy2, x2, weight.contiguous(), mean, rstd, dx, dw_part, db_part, M, H,
                dy2.stride(0), x2.stride(0), dx.stride(0),
                COMPUTE_DW=need_dw, COMPUTE_DB=need_db, BLOCK_H=block, ROWS=rows)
    dw = dw_part[:n].sum(0).to(weight.dtype) if need_dw else None
    db = db_part[:n].sum(0).to(bias_dtype) if need_db else None
    return dx, dw, db


class _RMSNormFn(torch.autograd.Function):
    """The eager form. Inside ``torch.compile`` the custom operators of
    :mod:`corept_kernels.ops.norms` run the same launches (an operator call adds dispatcher
    overhead that an eager step would pay per call)."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting):
        y, rstd = _rms_forward(x, weight, eps, offset, casting)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset, ctx.casting = offset, casting
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_backward(dy, x, weight, rstd, ctx.offset, ctx.casting, ctx.needs_input_grad[1])
        return dx.view(x.shape), dw, None, None, None


class _LayerNormFn(torch.autograd.Function):
    """Eager form (see :class:`_RMSNormFn`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = _ln_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        bias_dtype = ctx.bias_dtype if ctx.needs_input_grad[2] else None
        dx, dw, db = _ln_backward(dy, x, weight, mean, rstd, ctx.needs_input_grad[1], bias_dtype)
        return dx.view(x.shape), dw, db, None


def _eligibility(x: torch.Tensor, *params: torch.Tensor | None) -> str | None:
    if x.numel() and x.shape[-1] > MAX_H:
        return f"row width {x.shape[-1]} > MAX_H={MAX_H} (a row must fit in registers)"
    return unsupported_tensors(x, *params)


def _rms_norm_triton(x, weight, eps, *, offset=0.0, casting="scale_after_cast"):
    return _RMSNormFn.apply(x, weight, float(eps), float(offset), casting)


def _rms_norm_compiled(x, weight, eps, *, offset=0.0, casting="scale_after_cast"):
    return torch.ops.corept_kernels.rms_norm_fwd(x, weight, float(eps), float(offset), casting)[0]


def _layer_norm_triton(x, weight, bias, eps):
    return _LayerNormFn.apply(x, weight, bias, float(eps))


def _layer_norm_compiled(x, weight, bias, eps):
    return torch.ops.corept_kernels.layer_norm_fwd(x, weight, bias, float(eps))[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0,
             casting: str = "scale_after_cast") -> torch.Tensor:
    """RMSNorm of ``x [..., H]`` with scale ``offset + weight [H]``; result ``[..., H]``.

    ``casting`` selects where values are rounded (see :func:`corept_kernels.torch_ref.norms.rms_norm`):
    ``"scale_after_cast"`` (the normalised ``x`` rounded to ``x.dtype``, then scaled; result dtype
    ``promote(weight, x)``), ``"scale_in_fp32"`` (all in fp32, one rounding to ``x.dtype``; e.g.
    Gemma, with ``offset=1.0``), ``"none"`` (the Triton path computes in fp32 and rounds once;
    result ``x.dtype``). Falls back to the torch twin where the kernel cannot run.
    """
    if casting not in CASTING_MODES:
        raise ValueError(f"casting must be one of {CASTING_MODES}, got {casting!r}")
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    fn, _ = capabilities.dispatch("rms_norm", x, weight)
    return fn(x, weight, eps, offset=offset, casting=casting)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm of ``x [..., H]`` with ``weight [H]`` and optional ``bias [H]``, as
    ``F.layer_norm``: fp32 statistics, result in ``x.dtype``."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1] or (bias is not None and bias.shape != weight.shape):
        raise ValueError(f"weight/bias must be [{x.shape[-1]}]")
    fn, _ = capabilities.dispatch("layer_norm", x, weight, bias)
    return fn(x, weight, bias, eps)


capabilities.register(KernelInfo(
    name="rms_norm", triton_fn=_rms_norm_triton, reference_fn=ref.rms_norm, compiled_fn=_rms_norm_compiled,
    eligibility=_eligibility,
    notes="casting scale_after_cast/scale_in_fp32/none, weight offset; dX out of place; fp32 dW partials"))
capabilities.register(KernelInfo(
    name="layer_norm", triton_fn=_layer_norm_triton, reference_fn=ref.layer_norm, compiled_fn=_layer_norm_compiled,
    eligibility=_eligibility, notes="weight required, bias optional; fp32 statistics"))
