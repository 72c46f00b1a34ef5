"""autograd.Functions of the fused LoRA paths, with hand-derived backwards.

Notation, per LoRA linear ``L`` with input ``x`` ``[N, in]``: ``xa = x A^T`` ``[N, r]``,
``y = x W^T + s * xa B^T (+ bias)``. Given ``dy`` ``[N, out]``:

    dB  = s * dy^T xa              [out, r]
    dxa = s * dy B                 [N, r]
    dA  = dxa^T x                  [r, in]
    dx  = dy W + dxa A             [N, in]      (W frozen: no dW, ever)

Linears that share an input (q/k/v; gate/up) do their ``x A^T`` products as one matmul against the
stacked ``A``s, and likewise ``dxa A`` and ``dxa^T x`` in backward.

What is saved for backward (activations; parameters are referenced, not copied):

* :class:`LoraSharedInput` (q/k/v, o): ``x`` and ``xa`` (``[N, sum r]``). peft saves ``x`` plus,
  per linear, ``xa``, and when the adapter dtype differs from ``x`` (peft's default fp32 adapters
  on a bf16 model) one fp32 copy of ``x`` per linear.
* :class:`LoraMLP`: ``x``, the gate and up projections ``e``, ``g`` (``[N, F]``), and the small
  ``xa`` products of gate, up and down. peft also saves ``act(e)`` and ``h = act(e) * g`` (two more
  ``[N, F]``), plus fp32 copies of ``x`` and ``h`` under fp32 adapters. ``h`` is recomputed in
  backward by the fused activation kernel, which overwrites ``e``/``g``/``dh`` in place (so a
  second backward through the same graph, ``retain_graph=True``, fails loudly on the version check).

Measured (saved bytes, parameters excluded): Llama-3.1-8B MLP, 4x2048 tokens, r 16, bf16 adapters:
512.75 MiB vs peft's 960.75 MiB; q/k/v and o: equal to peft with bf16 adapters (64.75 / 64.25
MiB), and with fp32 adapters peft adds an fp32 copy of ``x`` per linear (test shapes: q/k/v
3,120 B vs 14,560 B).

Matmuls run through torch (cuBLAS on GPU). Base-weight matmuls run in the input dtype; the adapter
branch runs in the adapter dtype promoted with the input's (fp32 adapters on a bf16 model: an fp32
branch added to the base output before the cast back, as peft does); gradients of ``A``/``B`` are
returned in their own dtype. 4-bit bases are
dequantized right before each matmul that needs them and dropped right after.
"""
from __future__ import annotations

from typing import Sequence

import torch

from corept_kernels.lora_act import glu_backward_, glu_forward
from corept_kernels.lora_weights import LoraWeights


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``s * (a @ b)`` with a single rounding (the scale is the GEMM's alpha)."""
    if s == 1.0:
        return a @ b
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=s)


def _stacked_A(lws: Sequence[LoraWeights], As: Sequence[torch.Tensor], dt: torch.dtype) -> torch.Tensor:
    """The ``A``s of linears sharing an input, stacked: ``[sum r, in]`` in ``dt``."""
    if len(As) == 1:
        return As[0].to(dt)
    return torch.cat([A.to(dt) for A in As])


def lora_dtype(A: torch.Tensor, dt: torch.dtype) -> torch.dtype:
    """The dtype the adapter branch runs in: the adapter's own, promoted with the input's.

    peft runs ``lora_B(lora_A(x.to(A.dtype)))`` and adds it to the base output in that dtype (fp32
    adapters on a bf16 model: fp32 branch); matching it keeps the fused path's numerics peft's.
    """
    return torch.promote_types(A.dtype, dt)


def _forward_shared(x2: torch.Tensor, lws: Sequence[LoraWeights], As, Bs, dt: torch.dtype):
    """Outputs ``[N, out_i]`` (in ``dt``) of linears sharing ``x2`` ``[N, in]``, and ``xa``
    ``[N, sum r]`` (in the adapter dtype, see :func:`lora_dtype`)."""
    ldt = lora_dtype(As[0], dt)
    xa = (x2 if ldt == dt else x2.to(ldt)) @ _stacked_A(lws, As, ldt).t()
    outs, off = [], 0
    for lw, B in zip(lws, Bs):
        r = B.shape[1]
        w = lw.dense_weight(dt)
        y = x2 @ w.t()
        del w
        if lw.bias is not None:
            y += lw.bias.to(dt)
        if ldt == dt:
            y.addmm_(xa[:, off:off + r], B.to(dt).t(), alpha=lw.scaling)
        else:
            y = torch.addmm(y.to(ldt), xa[:, off:off + r], B.to(ldt).t(), alpha=lw.scaling).to(dt)
        outs.append(y)
        off += r
    return outs, xa


def _backward_lora_small(xa: torch.Tensor, douts, lws, Bs, need_B: Sequence[bool]):
    """``dB`` per linear (None where not needed) and ``dxa`` ``[N, sum r]`` for all of them."""
    dBs, dxas, off = [], [], 0
    for lw, B, d, need in zip(lws, Bs, douts, need_B):
        r = B.shape[1]
        d = d.to(xa.dtype)
        dBs.append(_mm_scaled(d.t(), xa[:, off:off + r], lw.scaling).to(B.dtype) if need else None)
        dxas.append(_mm_scaled(d, B.to(xa.dtype), lw.scaling))
        off += r
    return dBs, (dxas[0] if len(dxas) == 1 else torch.cat(dxas, dim=1))


def _backward_input(douts, dxa: torch.Tensor, lws, A_stack: torch.Tensor) -> torch.Tensor:
    """``dx = sum_i d_i W_i + dxa A_stack`` ``[N, in]``, dequantizing one base weight at a time."""
    dx = None
    for lw, d in zip(lws, douts):
        w = lw.dense_weight(d.dtype)
        dx = d @ w if dx is None else dx.addmm_(d, w)
        del w
    if dxa.dtype == dx.dtype:
        return dx.addmm_(dxa, A_stack)
    return dx.add_((dxa @ A_stack).to(dx.dtype))  # adapter-dtype branch, cast like peft's x.to(A.dtype)


def _split_dA(dxa: torch.Tensor, x2: torch.Tensor, As, need_A: Sequence[bool]):
    """``dA_i`` ``[r_i, in]`` from one ``dxa^T x`` product (None where not needed)."""
    if not any(need_A):
        return [None] * len(As)
    dA = dxa.t() @ x2.to(dxa.dtype)
    out, off = [], 0
    for A, need in zip(As, need_A):
        r = A.shape[0]
        out.append(dA[off:off + r].to(A.dtype) if need else None)
        off += r
    return out


def _bias_grad(d: torch.Tensor, bias, needed: bool):
    return d.sum(0).to(bias.dtype) if needed else None


class LoraSharedInput(torch.autograd.Function):
    """k LoRA linears on one input (q/k/v: k=3; o: k=1).

    ``apply(x, lws, *flat)`` with ``x`` ``[..., in]``, ``lws`` a tuple of :class:`LoraWeights`
    and ``flat`` = ``(A_1, B_1, bias_1, ..., A_k, B_k, bias_k)`` (the same tensors as in ``lws``,
    passed so autograd tracks them). Returns k tensors ``[..., out_i]``.
    """

    @staticmethod
    def forward(ctx, x, lws, *flat):
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        As, Bs = flat[0::3], flat[1::3]
        outs, xa = _forward_shared(x2, lws, As, Bs, dt)
        ctx.save_for_backward(x2, xa, *As, *Bs)
        ctx.lws = lws
        ctx.lead = x.shape[:-1]
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)

    @staticmethod
    def backward(ctx, *douts):
        x2, xa, *ab = ctx.saved_tensors
        k = len(ctx.lws)
        As, Bs = ab[:k], ab[k:]
        need = ctx.needs_input_grad
        need_A, need_B, need_b = need[2::3], need[3::3], need[4::3]
        d2 = [d.reshape(-1, d.shape[-1]).to(x2.dtype) for d in douts]
        dBs, dxa = _backward_lora_small(xa, d2, ctx.lws, Bs, need_B)
        dx = None
        if need[0]:
            dx = _backward_input(d2, dxa, ctx.lws, _stacked_A(ctx.lws, As, dxa.dtype)).view(*ctx.lead, x2.shape[1])
        dAs = _split_dA(dxa, x2, As, need_A)
        grads = [dx, None]
        for lw, dA, dB, d, nb in zip(ctx.lws, dAs, dBs, d2, need_b):
            grads += [dA, dB, _bias_grad(d, lw.bias, nb)]
        return tuple(grads)


class LoraMLP(torch.autograd.Function):
    """``y = down(act(gate(x)) * up(x))``, each a LoRA linear.

    ``apply(x, activation, (gate, up, down), *flat)`` with ``x`` ``[..., H]``, ``flat`` the
    ``(A, B, bias)`` triples of gate, up, down. Returns ``[..., out_down]``.
    """

    @staticmethod
    def forward(ctx, x, activation, lws, *flat):
        dt = x.dtype
        gate, up, down = lws
        x2 = x.reshape(-1, x.shape[-1])
        As, Bs = flat[0::3], flat[1::3]
        (e, g), xa_gu = _forward_shared(x2, (gate, up), As[:2], Bs[:2], dt)
        h = glu_forward(e, g, activation)
        (y,), xa_d = _forward_shared(h, (down,), As[2:], Bs[2:], dt)
        del h
        ctx.save_for_backward(x2, e, g, xa_gu, xa_d, *As, *Bs)
        ctx.lws, ctx.activation, ctx.lead = lws, activation, x.shape[:-1]
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, e, g, xa_gu, xa_d, Ag, Au, Ad, Bg, Bu, Bd = ctx.saved_tensors
        gate, up, down = ctx.lws
        need = ctx.needs_input_grad
        # flat triples start at index 3: gate (3,4,5), up (6,7,8), down (9,10,11)
        need_up = need[0] or any(need[3:9])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)

        (dBd,), dxa_d = _backward_lora_small(xa_d, (dy2,), (down,), (Bd,), (need[10],))
        dbd = _bias_grad(dy2, down.bias, need[11])
        if need_up:
            dh = _backward_input((dy2,), dxa_d, (down,), Ad.to(dxa_d.dtype))
            glu_backward_(dh, e, g, ctx.activation)  # dh <- h, e <- de, g <- dg
            h, de, dg = dh, e, g
        else:
            h = glu_forward(e, g, ctx.activation)
        (dAd,) = _split_dA(dxa_d, h, (Ad,), (need[9],))
        del h
        if not need_up:
            return (None,) * 3 + (None,) * 6 + (dAd, dBd, dbd)

        (dBg, dBu), dxa_gu = _backward_lora_small(xa_gu, (de, dg), (gate, up), (Bg, Bu), (need[4], need[7]))
        dbg, dbu = _bias_grad(de, gate.bias, need[5]), _bias_grad(dg, up.bias, need[8])
        dx = None
        if need[0]:
            A_gu = _stacked_A((gate, up), (Ag, Au), dxa_gu.dtype)
            dx = _backward_input((de, dg), dxa_gu, (gate, up), A_gu).view(*ctx.lead, x2.shape[1])
        dAg, dAu = _split_dA(dxa_gu, x2, (Ag, Au), (need[3], need[6]))
        return (dx, None, None, dAg, dBg, dbg, dAu, dBu, dbu, dAd, dBd, dbd)
