"""Gated activations for the fused LoRA MLP: forward, and a backward that works in place.

``h = act(e) * g`` with ``act`` one of ``"swiglu"`` (SiLU), ``"geglu_tanh"`` (GELU, tanh
approximation) or ``"geglu"`` (GELU, exact erf form); ``e`` is the gate projection, ``g`` the up
projection, both ``[N, F]``: contiguous, or column windows of one ``[N, 2F]`` output (the halves of
a fused ``gate_up`` linear, read and overwritten in place without a copy).

The backward, :func:`glu_backward_`, is the reason these kernels live here rather than in
:mod:`corept_kernels.glu`: it reads ``dh``, ``e`` and ``g`` once and overwrites them with
``h`` (recomputed, needed for the down projection's ``dA``), ``de`` and ``dg``, so the MLP backward
allocates no ``[N, F]`` buffer for them. Each is registered as a kernel (``"lora_glu"``,
``"lora_glu_backward"``): one Triton kernel where :func:`~corept_kernels.capabilities.dispatch`
allows (CUDA, or CPU under ``TRITON_INTERPRET=1``), torch elementwise code otherwise; math is fp32
internally (float64 for float64 inputs, which take the torch path).

**Rounding points.** The unfused reference, ``act_fn(gate_proj(x)) * up_proj(x)`` under autograd,
rounds to the storage dtype after every op: ``a = act(e)``, ``h = a * g``; in backward
``dg = dh * a``, ``da = dh * g`` and ``de = act'(e) * da``. The kernels compute in fp32 but round
``a`` and ``da`` to the storage dtype at the same two places (a no-op for fp32 and float64
storage), so that bf16 results follow the reference's rounding trajectory. Computing them
unrounded is individually more precise but draws an independent bf16 error sample, and on the
conformance models that alone put single LoRA gradients at up to 3x the reference's error
(e.g. Gemma-2's ``gate_proj.lora_B``). With the reference's rounding points the results are the
reference's bit for bit, except where fp32-level differences in ``act(e)`` itself (another
formula for tanh/erf) happen to cross a rounding boundary. Every rounding, stores included, is
round-to-nearest-even on every backend (``_rounded``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from corept_kernels import capabilities
from corept_kernels.capabilities import KernelInfo, unsupported_tensors
from corept_kernels.glu import GELU_C, INV_SQRT_2, INV_SQRT_2PI, SQRT_2_OVER_PI, act_and_grad, row_offsets
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
def _act_of_block(e_ptr, g_ptr, n, width, se, sg, CONTIG: tl.constexpr, ACT: tl.constexpr,
                  BLOCK: tl.constexpr):
    """This program's block of the ``[n / width, width]`` inputs (row strides ``se``, ``sg``):
    ``(idx, e offsets, g offsets, mask, a, act'(e), g)``, fp32, with ``a = act(e)`` rounded to the
    storage dtype (the reference's rounding point, module notes)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    oe, og = row_offsets(idx, width, se, CONTIG), row_offsets(idx, width, sg, CONTIG)
    e = tl.load(e_ptr + oe, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + og, mask=mask, other=0.0).to(tl.float32)
    a, da = act_and_grad(e, ACT)
    return idx, oe, og, mask, _rounded(a, e_ptr.dtype.element_ty), da, g


@triton.jit
def _glu_fwd_kernel(e_ptr, g_ptr, h_ptr, n, width, se, sg, CONTIG: tl.constexpr, ACT: tl.constexpr,
                    BLOCK: tl.constexpr):
    idx, _, _, mask, a, _, g = _act_of_block(e_ptr, g_ptr, n, width, se, sg, CONTIG, ACT, BLOCK)
    _store_rounded(h_ptr + idx, a * g, mask)  # h: contiguous


@triton.jit
def _glu_bwd_kernel(dh_ptr, e_ptr, g_ptr, n, width, sd, se, sg, CONTIG: tl.constexpr, ACT: tl.constexpr,
                    BLOCK: tl.constexpr):
    idx, oe, og, mask, a, da, g = _act_of_block(e_ptr, g_ptr, n, width, se, sg, CONTIG, ACT, BLOCK)
    od = row_offsets(idx, width, sd, CONTIG)
    dh = tl.load(dh_ptr + od, mask=mask, other=0.0).to(tl.float32)
    dact = _rounded(dh * g, dh_ptr.dtype.element_ty)
    _store_rounded(dh_ptr + od, a * g, mask)  # h
    _store_rounded(e_ptr + oe, dact * da, mask)  # de
    _store_rounded(g_ptr + og, dh * a, mask)  # dg


def _act_and_grad_torch(e: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 twin of :func:`corept_kernels.glu.act_and_grad`."""
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


_BLOCK = 1024


def _launch(kernel, first: torch.Tensor, *args, **meta) -> None:
    """Launch ``kernel`` over ``first.numel()`` elements, on ``first``'s GPU when it has one."""
    grid = (triton.cdiv(first.numel(), _BLOCK),)
    if first.is_cuda:
        with torch.cuda.device(first.device):
            kernel[grid](first, *args, BLOCK=_BLOCK, **meta)
    else:
        kernel[grid](first, *args, BLOCK=_BLOCK, **meta)


def _layout(*ts: torch.Tensor) -> tuple:
    """``(n, width, row strides..., CONTIG)`` of 2-D ``[N, F]`` tensors with unit column stride:
    ``CONTIG`` when every row stride is ``F`` (or there is one row), then indices are offsets."""
    n, width = ts[0].numel(), ts[0].shape[1]
    strides = [t.stride(0) for t in ts]
    return (n, width, *strides), all(s == width for s in strides) or ts[0].shape[0] <= 1


def _round(t: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``storage`` and back (identity when ``storage`` is ``t``'s dtype or wider)."""
    return t if t.dtype.itemsize <= storage.itemsize else t.to(storage).to(t.dtype)


def _dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, contiguous: torch's CPU ``sigmoid`` of a column window can differ by an
    ulp from the same values' contiguous one (another vectorized loop), and the twin must give the
    same values whatever the layout, as the kernel does."""
    return t.to(dtype).contiguous()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check(activation: str, *ts: torch.Tensor) -> None:
    activation_id(activation)
    for t in ts:
        if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1) or t.shape != ts[0].shape or t.dtype != ts[0].dtype:
            raise ValueError("glu kernels need [N, F] tensors of one shape and dtype with unit column stride")


def _glu_forward_triton(e: torch.Tensor, g: torch.Tensor, activation: str) -> torch.Tensor:
    h = torch.empty(e.shape, dtype=e.dtype, device=e.device)
    args, contig = _layout(e, g)
    _launch(_glu_fwd_kernel, e, g, h, *args, CONTIG=contig, ACT=activation_id(activation))
    return h


def _glu_forward_torch(e: torch.Tensor, g: torch.Tensor, activation: str) -> torch.Tensor:
    ct = _compute_dtype(e)
    a, _ = _act_and_grad_torch(_dense(e, ct), activation)
    return (_round(a, e.dtype) * g.to(ct)).to(e.dtype).contiguous()


def _glu_backward_triton_(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, activation: str) -> None:
    args, contig = _layout(dh, e, g)
    _launch(_glu_bwd_kernel, dh, e, g, *args, CONTIG=contig, ACT=activation_id(activation))
    for t in (dh, e, g):
        torch.autograd.graph.increment_version(t)


def _glu_backward_torch_(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, activation: str) -> None:
    # row-chunked so the fp32 temporaries stay small
    rows = max(1, (1 << 24) // max(1, e.shape[-1]))
    ct = _compute_dtype(e)
    for i in range(0, e.shape[0], rows):
        ef, gf, dhf = _dense(e[i:i + rows], ct), g[i:i + rows].to(ct), dh[i:i + rows].to(ct)
        a, da = _act_and_grad_torch(ef, activation)
        a = _round(a, e.dtype)
        h, de, dg = a * gf, _round(dhf * gf, e.dtype) * da, dhf * a  # all computed before any write
        dh[i:i + rows], e[i:i + rows], g[i:i + rows] = h, de, dg


def glu_forward(e: torch.Tensor, g: torch.Tensor, activation: str) -> torch.Tensor:
    """``h = act(e) * g``.

    :param e: ``[N, F]`` gate projection, unit column stride (contiguous, or a column window).
    :param g: ``[N, F]`` up projection, same dtype and layout rule.
    :returns: ``h``, ``[N, F]`` contiguous, in ``e.dtype``, computed in fp32 (float64 for float64 inputs,
        which take the torch path) with ``act(e)`` rounded to ``e.dtype`` before the product (the
        reference's rounding points, see the module notes).
    """
    _check(activation, e, g)
    fn, _ = capabilities.dispatch("lora_glu", e, g)
    return fn(e, g, activation)


def glu_backward_(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, activation: str) -> None:
    """In place: ``dh <- h = act(e) * g``, ``e <- de = dh * g * act'(e)``, ``g <- dg = dh * act(e)``
    (with ``act(e)`` and ``dh * g`` rounded to the storage dtype, as the reference rounds them).

    All three are ``[N, F]`` of one dtype with unit column stride (``e``, ``g`` may be the column
    halves of one ``[N, 2F]`` buffer, which then holds ``[de | dg]``). The version counters of the three tensors are
    bumped, so a second backward through a graph that saved ``e`` or ``g`` fails loudly instead of
    reading the overwritten values.
    """
    _check(activation, dh, e, g)
    fn, _ = capabilities.dispatch("lora_glu_backward", dh, e, g)
    fn(dh, e, g, activation)


def _glu_forward_compiled(e, g, activation):
    return torch.ops.corept_kernels.lora_glu(e, g, activation)


def _glu_backward_compiled_(dh, e, g, activation):
    torch.ops.corept_kernels.lora_glu_backward_(dh, e, g, activation)


_NOTES = "inside the fused LoRA MLP; float64 (gold references) takes the torch path; not differentiable"
capabilities.register(KernelInfo(
    name="lora_glu", triton_fn=_glu_forward_triton, reference_fn=_glu_forward_torch, has_backward=False,
    compiled_fn=_glu_forward_compiled,
    devices=("cuda",), eligibility=unsupported_tensors,
    notes="h = act(e) * g with the reference's rounding points; " + _NOTES))
capabilities.register(KernelInfo(
    name="lora_glu_backward", triton_fn=_glu_backward_triton_, reference_fn=_glu_backward_torch_,
    has_backward=False, compiled_fn=_glu_backward_compiled_, devices=("cuda",), eligibility=unsupported_tensors,
    notes="in place: dh <- h, e <- de, g <- dg, one read of each; " + _NOTES))
