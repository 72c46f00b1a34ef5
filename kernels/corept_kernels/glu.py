"""Gated activations ``act(gate) * up`` (SwiGLU, GeGLU tanh/erf): Triton forward and backward.

Both passes are flat 1-D kernels over the ``M * N`` elements of ``[..., N]`` (``BLOCK`` elements per
program). Contiguous tensors are indexed directly; row-strided ones (e.g. ``gate, up =
gate_up.chunk(2, -1)``) through ``row * stride + col``, without a copy. Math in fp32, results in the
tensors' dtypes. Backward writes ``d_gate`` and ``d_up`` to fresh buffers (never into the saved
inputs), recomputing the activation from the saved ``gate``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from corept_kernels import capabilities
from corept_kernels.capabilities import KernelInfo, unsupported_tensors
from corept_kernels.torch_ref import glu as ref
from corept_kernels.torch_ref.glu import GELU_APPROXIMATIONS

_SILU, _GELU_TANH, _GELU_ERF = 0, 1, 2
BLOCK = 4096

# Tests set this to True: every buffer a kernel must fill starts as NaN, so unwritten elements show.
POISON_OUTPUTS = False


def _empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


SQRT_2_OVER_PI = 0.7978845608028654
INV_SQRT_2 = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327
GELU_C = 0.044715
# the same constants for the kernels (compiled Triton only reads constexpr globals)
_K_SQRT_2_OVER_PI = tl.constexpr(SQRT_2_OVER_PI)
_K_INV_SQRT_2 = tl.constexpr(INV_SQRT_2)
_K_INV_SQRT_2PI = tl.constexpr(INV_SQRT_2PI)
_K_GELU_C = tl.constexpr(GELU_C)


@triton.jit
def act_and_grad(e, ACT: tl.constexpr):
    """fp32 ``e`` -> (act(e), act'(e)); ``ACT`` 0 SiLU, 1 GELU (tanh approximation), 2 GELU (erf).

    The one copy of the activation math: the gated-activation kernels here and the fused LoRA
    MLP's (:mod:`corept_kernels.lora.activation`) both call it."""
    if ACT == 0:
        s = tl.sigmoid(e)
        a = e * s
        da = s * (1.0 + e * (1.0 - s))
    elif ACT == 1:
        u = _K_SQRT_2_OVER_PI * (e + _K_GELU_C * e * e * e)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u); libdevice tanh is not in the interpreter
        a = 0.5 * e * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t * t) * _K_SQRT_2_OVER_PI * (1.0 + 3.0 * _K_GELU_C * e * e)
    else:
        cdf = 0.5 * (1.0 + tl.erf(e * _K_INV_SQRT_2))
        a = e * cdf
        da = cdf + e * tl.exp(-0.5 * e * e) * _K_INV_SQRT_2PI
    return a, da


@triton.jit
def row_offsets(idx, N, stride, CONTIG: tl.constexpr):
    """Offsets of the flat element indices ``idx`` of an ``[M, N]`` tensor with row stride
    ``stride`` and unit column stride: ``idx`` itself when ``CONTIG`` (``stride == N``), else
    ``row * stride + col`` (a column window such as one half of ``gate_up``, read without a copy).
    Shared with the fused LoRA MLP's gated activation (:mod:`corept_kernels.lora.activation`)."""
    if CONTIG:
        off = idx
    else:
        row = idx // N
        off = row * stride + (idx - row * N)
    return off


@triton.jit
def _glu_fwd_kernel(G, U, Y, n_elem, N, sg, su, ACT: tl.constexpr, CONTIG: tl.constexpr,
                    BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elem
    g = tl.load(G + row_offsets(idx, N, sg, CONTIG), mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row_offsets(idx, N, su, CONTIG), mask=mask, other=0.0).to(tl.float32)
    a, _ = act_and_grad(g, ACT)
    tl.store(Y + idx, (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DY, G, U, DG, DU, n_elem, N, sdy, sg, su, ACT: tl.constexpr,
                    CONTIG: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elem
    dy = tl.load(DY + row_offsets(idx, N, sdy, CONTIG), mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row_offsets(idx, N, sg, CONTIG), mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row_offsets(idx, N, su, CONTIG), mask=mask, other=0.0).to(tl.float32)
    a, da = act_and_grad(g, ACT)
    tl.store(DG + idx, (dy * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + idx, (dy * a).to(DU.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[M, N]`` with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _contig(N: int, *ts: torch.Tensor) -> bool:
    return all(t.stride(0) == N or t.shape[0] == 1 for t in ts)


def _glu_forward(gate, up, act: int):
    """``(y, g2, u2)``: ``y = act(gate) * up`` (``[..., N]``, contiguous, ``promote(gate, up)``
    dtype) and the ``[M, N]`` rows of ``gate`` and ``up`` the kernel read (a backward reuses them)."""
    N = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    n = g2.numel()
    y = _empty(gate.shape, torch.promote_types(gate.dtype, up.dtype), gate.device)
    _glu_fwd_kernel[(triton.cdiv(n, BLOCK),)](
        g2, u2, y, n, N, g2.stride(0), u2.stride(0), ACT=act, CONTIG=_contig(N, g2, u2),
        BLOCK=BLOCK, num_warps=8)
    return y, g2, u2


def _glu_backward(dy, gate, up, act: int):
    """``(d_gate, d_up)``, contiguous with ``dy``'s shape ``[..., N]``, in ``gate``'s and ``up``'s
    dtypes; ``gate``/``up`` as given to the forward or as its ``[M, N]`` rows."""
    N = gate.shape[-1]
    g2, u2, dy2 = _rows(gate), _rows(up), _rows(dy)
    n = g2.numel()
    dg = _empty(dy.shape, g2.dtype, g2.device)
    du = _empty(dy.shape, u2.dtype, u2.device)
    _glu_bwd_kernel[(triton.cdiv(n, BLOCK),)](
        dy2, g2, u2, dg, du, n, N, dy2.stride(0), g2.stride(0), u2.stride(0), ACT=act,
        CONTIG=_contig(N, dy2, g2, u2), BLOCK=BLOCK, num_warps=8)
    return dg, du


class _GluFn(torch.autograd.Function):
    """The eager form; inside ``torch.compile`` the operators of :mod:`corept_kernels.ops.glu`
    run the same launches."""

    @staticmethod
    def forward(ctx, gate, up, act):
        y, g2, u2 = _glu_forward(gate, up, act)
        ctx.save_for_backward(g2, u2)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dg, du = _glu_backward(dy, g2, u2, ctx.act)
        return dg, du, None


def _act_id(approximate: str) -> int:
    return _GELU_TANH if approximate == "tanh" else _GELU_ERF


def _swiglu_triton(gate, up):
    return _GluFn.apply(gate, up, _SILU)


def _swiglu_compiled(gate, up):
    return torch.ops.corept_kernels.glu_fwd(gate, up, _SILU)


def _geglu_triton(gate, up, approximate="tanh"):
    return _GluFn.apply(gate, up, _act_id(approximate))


def _geglu_compiled(gate, up, approximate="tanh"):
    return torch.ops.corept_kernels.glu_fwd(gate, up, _act_id(approximate))


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate``, ``up`` of one shape ``[..., N]``; fp32 math, result in
    ``promote(gate, up)`` dtype. Backward gives ``d_gate`` and ``d_up``."""
    _check(gate, up)
    fn, _ = capabilities.dispatch("swiglu", gate, up)
    return fn(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` (``"tanh"``: the tanh approximation, HF's
    ``gelu_pytorch_tanh``; ``"none"``: the exact erf form), shapes ``[..., N]``; fp32 math, result
    in ``promote(gate, up)`` dtype."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    _check(gate, up)
    fn, _ = capabilities.dispatch("geglu", gate, up)
    return fn(gate, up, approximate)


capabilities.register(KernelInfo(
    name="swiglu", triton_fn=_swiglu_triton, reference_fn=ref.swiglu, compiled_fn=_swiglu_compiled,
    eligibility=unsupported_tensors, notes="row-strided inputs without copy; out of place"))
capabilities.register(KernelInfo(
    name="geglu", triton_fn=_geglu_triton, reference_fn=ref.geglu, compiled_fn=_geglu_compiled,
    eligibility=unsupported_tensors, notes="approximate tanh or none (erf); out of place"))
