"""Gated activations for the fused LoRA MLP: forward, and a backward that works in place.

``h = act(e) * g`` with ``act`` one of ``"swiglu"`` (SiLU), ``"geglu_tanh"`` (GELU, tanh
approximation) or ``"geglu"`` (GELU, exact erf form); ``e`` is the gate projection, ``g`` the up
projection, both ``[N, F]``.

The backward, :func:`glu_backward_`, is the reason these kernels live here rather than in
:mod:`corept_kernels.activations`: it reads ``dh``, ``e`` and ``g`` once and overwrites them with
``h`` (recomputed, needed for the down projection's ``dA``), ``de`` and ``dg``, so the MLP backward
allocates no ``[N, F]`` buffer for them. Both run one Triton kernel on CUDA (or on CPU under
``TRITON_INTERPRET=1``) and torch elementwise code otherwise; math is fp32 internally (float64 for
float64 inputs, which take the torch path).

**Rounding points.** The unfused reference, ``act_fn(gate_proj(x)) * up_proj(x)`` under autograd,
rounds to the storage dtype after every op: ``a = act(e)``, ``h = a * g``; in backward
``dg = dh * a``, ``da = dh * g`` and ``de = act'(e) * da``. The kernels compute in fp32 but round
``a`` and ``da`` to the storage dtype at the same two places (a no-op for fp32 and float64
storage), so that bf16 results follow the reference's rounding trajectory. Computing them
unrounded is individually more precise but draws an independent bf16 error sample, and on the
conformance models that alone put single LoRA gradients at up to 3x the reference's error
(gemma2 ``gate_proj.lora_B``). With the reference's rounding points the results are the
reference's bit for bit, except where fp32-level differences in ``act(e)`` itself (another
formula for tanh/erf) happen to cross a rounding boundary. Every rounding, stores included, is
round-to-nearest-even on every backend (``_rounded``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from corept_kernels.activations import GELU_C, INV_SQRT_2, INV_SQRT_2PI, SQRT_2_OVER_PI, act_and_grad
from corept_kernels.capabilities import interpreter_active
from corept_kernels.rounding import rounded as _rounded
from corept_kernels.rounding import store_rounded as _store_rounded

ACTIVATIONS = ("swiglu", "geglu_tanh", "geglu")
_ACT_ID = {name: i for i, name in enumerate(ACTIVATIONS)}


def activation_id(activation: str) -> int:
    """The kernel's integer code for ``activation``; ``ValueError`` names the supported ones."""
    try:
        return _ACT_ID[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}") from None


@triton.jit
def _glu_fwd_kernel(e_ptr, g_ptr, h_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = act_and_grad(e, ACT)
    a = _rounded(a, h_ptr.dtype.element_ty)  # the reference's rounding points (module notes)
    _store_rounded(h_ptr + offs, a * g, mask)


@triton.jit
def _glu_bwd_kernel(dh_ptr, e_ptr, g_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = act_and_grad(e, ACT)
    a = _rounded(a, dh_ptr.dtype.element_ty)  # the reference's rounding points (module notes)
    dact = _rounded(dh * g, dh_ptr.dtype.element_ty)
    _store_rounded(dh_ptr + offs, a * g, mask)  # h
    _store_rounded(e_ptr + offs, dact * da, mask)  # de
    _store_rounded(g_ptr + offs, dh * a, mask)  # dg


def _act_and_grad_torch(e: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 twin of :func:`corept_kernels.activations.act_and_grad`."""
    if activation == "swiglu":
        s = torch.sigmoid(e)
        return e * s, s * (1.0 + e * (1.0 - s))
    if activation == "geglu_tanh":
        t = torch.tanh(SQRT_2_OVER_PI * (e + GELU_C * e.pow(3)))
        a = 0.5 * e * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * e * e)
        return a, da
    cdf = 0.5 * (1.0 + torch.erf(e * INV_SQRT_2))
    return e * cdf, cdf + e * torch.exp(-0.5 * e * e) * INV_SQRT_2PI


def _built_for_interpreter() -> bool:
    """True when the kernels were decorated with TRITON_INTERPRET=1 (set before this import)."""
    return type(_glu_fwd_kernel).__name__ == "InterpretedFunction"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``: CUDA, or CPU when the interpreter is on *and*
    was on when this module was imported (else launching would fail with "0 active drivers")."""
    if t.numel() == 0:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpreter_active() and _built_for_interpreter()


_BLOCK = 1024


def _launch(kernel, first: torch.Tensor, *args, **meta) -> None:
    """Launch ``kernel`` over ``first.numel()`` elements, on ``first``'s GPU when it has one."""
    grid = (triton.cdiv(first.numel(), _BLOCK),)
    if first.is_cuda:
        with torch.cuda.device(first.device):
            kernel[grid](first, *args, BLOCK=_BLOCK, **meta)
    else:
        kernel[grid](first, *args, BLOCK=_BLOCK, **meta)


def _round(t: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``storage`` and back (identity when ``storage`` is ``t``'s dtype or wider)."""
    return t if t.dtype.itemsize <= storage.itemsize else t.to(storage).to(t.dtype)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check(*ts: torch.Tensor) -> None:
    for t in ts:
        if not t.is_contiguous() or t.shape != ts[0].shape or t.dtype != ts[0].dtype:
            raise ValueError("glu kernels need contiguous tensors of one shape and dtype")


def glu_forward(e: torch.Tensor, g: torch.Tensor, activation: str, *, triton_ok: bool | None = None) -> torch.Tensor:
    """``h = act(e) * g``.

    :param e: ``[N, F]`` gate projection, contiguous.
    :param g: ``[N, F]`` up projection, same dtype.
    :param triton_ok: force (True/False) or let the device decide (None) which implementation runs.
        float64 inputs (used for gold references) always take the torch path, in float64.
    :returns: ``h``, ``[N, F]``, in ``e.dtype``, computed in fp32 with ``act(e)`` rounded to
        ``e.dtype`` before the product (the reference's rounding points, see the module notes).
    """
    act = activation_id(activation)
    _check(e, g)
    if triton_ok is None:
        triton_ok = use_triton(e) and e.dtype != torch.float64
    if not triton_ok:
        ct = _compute_dtype(e)
        a, _ = _act_and_grad_torch(e.to(ct), activation)
        return (_round(a, e.dtype) * g.to(ct)).to(e.dtype)
    h = torch.empty_like(e)
    _launch(_glu_fwd_kernel, e, g, h, e.numel(), ACT=act)
    return h


def glu_backward_(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, activation: str, *,
                  triton_ok: bool | None = None) -> None:
    """In place: ``dh <- h = act(e) * g``, ``e <- de = dh * g * act'(e)``, ``g <- dg = dh * act(e)``
    (with ``act(e)`` and ``dh * g`` rounded to the storage dtype, as the reference rounds them).

    All three are ``[N, F]``, contiguous, one dtype. The version counters of the three tensors are
    bumped, so a second backward through a graph that saved ``e`` or ``g`` fails loudly instead of
    reading the overwritten values.
    """
    act = activation_id(activation)
    _check(dh, e, g)
    if triton_ok is None:
        triton_ok = use_triton(e) and e.dtype != torch.float64
    if triton_ok:
        _launch(_glu_bwd_kernel, dh, e, g, e.numel(), ACT=act)
        for t in (dh, e, g):
            torch.autograd.graph.increment_version(t)
        return
    # torch fallback, row-chunked so the fp32 temporaries stay small
    rows = max(1, (1 << 24) // max(1, e.shape[-1]))
    for i in range(0, e.shape[0], rows):
        ct = _compute_dtype(e)
        ef, gf, dhf = e[i:i + rows].to(ct), g[i:i + rows].to(ct), dh[i:i + rows].to(ct)
        a, da = _act_and_grad_torch(ef, activation)
        a = _round(a, e.dtype)
        h, de, dg = a * gf, _round(dhf * gf, e.dtype) * da, dhf * a  # all computed before any write
        dh[i:i + rows], e[i:i + rows], g[i:i + rows] = h, de, dg
