"""The fused LoRA paths' shared-input autograd.Function and the pieces every fused path is made of.

Notation, per LoRA linear ``L`` with input ``x`` ``[N, in]``: ``xa = x A^T`` ``[N, r]``,
``y = x W^T (+ bias) + s * xa B^T``. Given ``dy`` ``[N, out]``:

    dB  = (s dy)^T xa              [out, r]
    dxa = (s dy) B                 [N, r]
    dA  = dxa^T x                  [r, in]
    dx  = dxa A + dy W             [N, in]      (W frozen: no dW, ever)

Linears that share an input (q/k/v; gate/up) run as one autograd node: the input is saved (and
cast to the adapter dtype) once, ``dA`` for all of them is one ``dxa^T x`` matmul against the
stacked ``[N, sum r]`` ``dxa``, and ``dx`` is one accumulation (in peft's order, below). The MLP's
node, which also runs a fused ``gate_up`` linear as the one linear it is, is
:class:`corept_kernels.lora.mlp.LoraMLP`.

**Rounding points are peft's.** The adapter branch runs in the *adapter* dtype promoted with the
input's (:func:`lora_dtype`; fp32 adapters on a bf16 model: an fp32 branch), and every value is
rounded to the model dtype exactly where peft's ``LoraLayer.forward`` and autograd round it:

* forward, float base: the base product ``x W^T`` in the model dtype, the branch ``(xa B^T) * s``
  added to it in the adapter dtype, the sum rounded once; bitsandbytes 4-bit base (peft's
  ``Linear4bit``): the branch is rounded to the model dtype first, then added (two roundings);
* backward: ``dx`` is accumulated in the model dtype in the order autograd accumulates peft's
  contributions: linears in reverse order, each one's branch ``(dxa A)`` before its base ``dy W``,
  each rounded, each sum rounded. (The gated activation's rounding points are in
  :mod:`corept_kernels.lora.activation`.)
* one linear whose output is split (a fused ``gate_up_proj``: ``W`` ``[2F, H]``, one ``A`` and
  ``B``) is one linear for these rules, not two: one base product, one ``x A^T``, one branch, and
  in backward one ``dxa`` and one ``dy W`` over the whole output (:mod:`corept_kernels.lora.mlp`).

Equal rounding points keep the fused path's bf16 results on the trajectory of the reference it
replaces. Rounding once where peft rounds two or three times is individually more precise, but
draws an independent error sample whose max over a small tensor drifts 2-4x from the reference's
(issue 4: single bf16 LoRA gradients above 2x peft's error). ``x A^T`` is one product per
linear, with peft's GEMM shape, for the same reason.

What is saved for backward (activations; parameters are referenced, not copied):

* :class:`LoraSharedInput` (q/k/v, o): ``x`` and ``xa`` (``[N, sum r]``). peft saves ``x`` plus,
  per linear, ``xa``, and when the adapter dtype differs from ``x`` (peft's default fp32 adapters
  on a bf16 model) one fp32 copy of ``x`` per linear.
* the MLP: ``x``, the gate and up projections and the small ``xa`` products
  (:mod:`corept_kernels.lora.mlp`).

**fp32 adapters on a bf16 model** (peft's default, the common case) run the branch through
:mod:`corept_kernels.lora.branch`: bf16-operand GEMMs with fp32 accumulation whose values equal
peft's fp32 ones to fp32 precision, rounded at the points below; no fp32 copy of an activation
is made. The paragraphs below describe the generic path, which every other dtype pair takes.

**Transients.** When the adapter dtype differs from the model's, every cast of an ``[N, width]``
activation to the adapter dtype (``h``, ``de``, ``dg``, the branch outputs and ``dxa A``) is done
over row chunks of at most :data:`~corept_kernels.lora.chunks.CHUNK_BYTES`, so the fp32
temporaries stay bounded whatever ``N``. The rank-``r`` products added into model-dtype tensors
(``xa B^T``, ``dxa A``) run in such chunks in every case. Other matmuls of same-dtype adapters
need no cast and run whole. ``dx`` starts from the first base product, so it needs no buffer of
its own.

Measured (saved bytes, parameters excluded): Llama-3.1-8B q/k/v and o, 4x2048 tokens, r 16:
equal to peft with bf16 adapters (64.75 / 64.25 MiB), and with fp32 adapters peft adds an fp32
copy of ``x`` per linear.

Matmuls run through torch (cuBLAS on GPU); base-weight matmuls in the input dtype. 4-bit bases are
dequantized right before each matmul that needs them and dropped right after.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from corept_kernels.lora import branch as lb
from corept_kernels.lora.chunks import product_rows
from corept_kernels.lora.weights import LoraWeights


def lora_dtype(A: torch.Tensor, dt: torch.dtype) -> torch.dtype:
    """The dtype the adapter branch runs in: the adapter's own, promoted with the input's.

    peft runs ``lora_B(lora_A(x.to(A.dtype)))`` (fp32 adapters on a bf16 model: fp32 branch);
    matching it keeps the fused path's numerics peft's (for fp32 adapters on a bf16 model through
    :mod:`corept_kernels.lora.branch`'s bf16-operand GEMMs).
    """
    return torch.promote_types(A.dtype, dt)


def _rows(n: int, width: int, ldt: torch.dtype, dt: torch.dtype) -> list[slice]:
    """Row slices of ``[n, width]``: one when no cast to ``ldt`` is needed, else chunks whose
    ``ldt`` copy takes at most :data:`~corept_kernels.lora.chunks.CHUNK_BYTES`."""
    return [slice(0, n)] if ldt == dt else product_rows(n, width, ldt.itemsize)


def _product_rows(n: int, width: int, ldt: torch.dtype) -> list[slice]:
    """Row slices of ``[n, width]`` for a rank-``r`` product (``xa B^T``, ``dxa A``) whose result
    is added into a model-dtype tensor: chunks of at most
    :data:`~corept_kernels.lora.chunks.CHUNK_BYTES` whatever the dtypes.

    The inner dimension is the LoRA rank, so splitting the rows changes no element's sum; the
    full-size temporary it avoids is one ``[N, width]`` (e.g. one ``[N, H]`` in q/k/v's backward).
    """
    return product_rows(n, width, ldt.itemsize)


def _offsets(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Column ranges of each linear's block in a stacked ``[N, sum r]`` product."""
    out, off = [], 0
    for r in ranks:
        out.append((off, off + r))
        off += r
    return out


def _xa(x2: torch.Tensor, As: Sequence[torch.Tensor], ldt: torch.dtype) -> torch.Tensor:
    """``[x2 A_1^T, ..., x2 A_k^T]`` ``[N, sum r]`` in ``ldt``, casting ``x2`` by row chunks.

    One product per ``A`` (not one against the stacked ``A``s): each then has peft's GEMM shape and
    so its fp32 results, which the model-dtype rounding of the outputs would otherwise turn into
    occasional one-ulp differences.
    """
    dt = x2.dtype
    if lb.uses_split(ldt, dt):
        return lb.xa(x2, As)
    Als = [A.to(ldt) for A in As]
    xa = x2.new_empty(x2.shape[0], sum(A.shape[0] for A in As), dtype=ldt)
    offs = _offsets([A.shape[0] for A in As])
    for sl in _rows(x2.shape[0], x2.shape[1], ldt, dt):
        xs = x2[sl] if ldt == dt else x2[sl].to(ldt)
        for Al, (a, b) in zip(Als, offs):
            xa[sl, a:b] = xs @ Al.t()
    return xa


def _base(x2: torch.Tensor, lw: LoraWeights, dt: torch.dtype) -> torch.Tensor:
    """The base layer's output ``[N, out]`` in ``dt`` (a 4-bit weight is dequantized and dropped)."""
    w = lw.dense_weight(dt)
    return F.linear(x2, w, None if lw.bias is None else lw.bias.to(dt))


def _forward_one(x2: torch.Tensor, lw: LoraWeights, xa: torch.Tensor, B: torch.Tensor, dt: torch.dtype):
    """``[N, out]`` in ``dt``: the base product, plus the branch ``(xa B^T) * s`` added as peft does."""
    y = _base(x2, lw, dt)
    if lb.uses_split(xa.dtype, dt):
        return lb.add_branch_(y, xa, B, lw.scaling, lw.is_4bit)
    ldt, Bt = xa.dtype, B.to(xa.dtype).t()
    for sl in _product_rows(y.shape[0], y.shape[1], ldt):
        z = xa[sl] @ Bt
        if lw.scaling != 1.0:
            z.mul_(lw.scaling)
        if ldt == dt:
            y[sl] += z
        elif lw.is_4bit:  # peft's bnb Linear4bit: output.to(result dtype), then result + output
            y[sl] += z.to(dt)
        else:  # peft's Linear: result (model dtype) + branch (adapter dtype), rounded once
            y[sl] = z.add_(y[sl]).to(dt)
    return y


def _forward_shared(x2: torch.Tensor, lws: Sequence[LoraWeights], As, Bs, dt: torch.dtype):
    """Outputs ``[N, out_i]`` (in ``dt``) of linears sharing ``x2`` ``[N, in]``, and ``xa``
    ``[N, sum r]`` (in the adapter dtype, see :func:`lora_dtype`)."""
    xa = _xa(x2, As, lora_dtype(As[0], dt))
    offs = _offsets([B.shape[1] for B in Bs])
    if len(lws) > 1 and lb.uses_split(xa.dtype, dt) and len({lw.is_4bit for lw in lws}) == 1:
        outs = [_base(x2, lw, dt) for lw in lws]  # then every branch in one launch
        lb.add_branches_(outs, [xa[:, a:b] for a, b in offs], Bs, [lw.scaling for lw in lws], lws[0].is_4bit)
        return outs, xa
    outs = [_forward_one(x2, lw, xa[:, a:b], B, dt) for lw, B, (a, b) in zip(lws, Bs, offs)]
    return outs, xa


def _backward_small(xa: torch.Tensor, douts, lws, Bs, need_B: Sequence[bool]):
    """``dB`` per linear (None where not needed) and ``dxa`` ``[N, sum r]`` (adapter dtype)."""
    ldt, dt = xa.dtype, douts[0].dtype
    dxa = torch.empty_like(xa)
    dBs = []
    ranks = [B.shape[1] for B in Bs]
    split = lb.uses_split(ldt, dt)
    xs = lb.split_blocks(xa, ranks, dt) if split and any(need_B) else None
    b_parts = (lb.stacked_row_split(Bs, dt) if split else None) or [None] * len(Bs)
    for lw, B, d, need, bp, (a, b) in zip(lws, Bs, douts, need_B, b_parts, _offsets(ranks)):
        if split:
            xs_i = xs[:, 2 * a:2 * b] if xs is not None else None
            dB, _ = lb.dxa_dB(d, xs_i, B, lw.scaling, need, out=dxa[:, a:b], b_parts=bp)
            dBs.append(dB.to(B.dtype) if need else None)
            continue
        Bl = B.to(ldt)
        dB = None
        for sl in _rows(d.shape[0], d.shape[1], ldt, dt):
            ds = d[sl].to(ldt)  # a copy when casting; d itself otherwise (then scaled out of place)
            ds = ds.mul_(lw.scaling) if ldt != dt else (ds * lw.scaling if lw.scaling != 1.0 else ds)
            torch.mm(ds, Bl, out=dxa[sl, a:b])
            if need:
                dB = ds.t() @ xa[sl, a:b] if dB is None else dB.addmm_(ds.t(), xa[sl, a:b])
        dBs.append(dB.to(B.dtype) if need else None)
    return dBs, dxa


def _backward_input(douts, dxa: torch.Tensor, lws, As, weights=None) -> torch.Tensor:
    """``dx`` ``[N, in]`` in the model dtype, accumulated in peft's order (see the module notes):
    for linears last to first, ``+= dxa_i A_i`` (adapter dtype, rounded) then ``+= d_i W_i``.
    ``weights``: the linears' dense base weights when the caller already holds them (a 4-bit base
    dequantized once for several row chunks); else each is made here and dropped after its use."""
    ldt, dt = dxa.dtype, douts[0].dtype
    offs = _offsets([A.shape[0] for A in As])
    dx = None
    for i, lw, A, d, (a, b) in reversed(list(zip(range(len(lws)), lws, As, douts, offs))):
        w = lw.dense_weight(dt) if weights is None else weights[i]
        base = d @ w
        del w
        first, dx = dx is None, base if dx is None else dx
        # the first two terms commute (one rounded sum): start from the base product, no extra buffer
        if lb.uses_split(ldt, dt):
            lb.add_dx_branch_(dx, dxa[:, a:b], A)
        else:
            Al = A.to(ldt)
            for sl in _product_rows(dx.shape[0], dx.shape[1], ldt):
                br = dxa[sl, a:b] @ Al
                dx[sl] += br if ldt == dt else br.to(dt)
        if not first:
            dx += base
        del base
    return dx


def _dA(dxa: torch.Tensor, x2: torch.Tensor, As, need_A: Sequence[bool]):
    """``dA_i`` ``[r_i, in]`` from one ``dxa^T x`` product (None where not needed)."""
    if not any(need_A):
        return [None] * len(As)
    ldt, dA = dxa.dtype, None
    if lb.uses_split(ldt, x2.dtype):
        dA = lb.dA(dxa, x2)
    else:
        for sl in _rows(x2.shape[0], x2.shape[1], ldt, x2.dtype):
            xs = x2[sl].to(ldt)
            dA = dxa[sl].t() @ xs if dA is None else dA.addmm_(dxa[sl].t(), xs)
    out, off = [], 0
    for A, need in zip(As, need_A):
        out.append(dA[off:off + A.shape[0]].to(A.dtype) if need else None)
        off += A.shape[0]
    return out


def _bias_grad(d: torch.Tensor, bias, needed: bool):
    return d.sum(0).to(bias.dtype) if needed else None


def autocast_off_backward(backward):
    """Run a Function's backward with autocast off, as its forward ran (``lora.api._apply``).

    autograd hands a backward the thread-local state of the ``backward()`` call, so one called
    inside an autocast region would cast the backward's matmuls to the autocast dtype while the
    saved tensors are in the forward's. The forward stores ``ctx.device_type``.
    """
    @functools.wraps(backward)
    def run(ctx, *grads):
        with torch.autocast(ctx.device_type, enabled=False):
            return backward(ctx, *grads)
    return run


def shared_backward(douts, x2: torch.Tensor, xa: torch.Tensor, lws, As, Bs, need_x: bool, need_A, need_B, need_b):
    """The backward of k LoRA linears sharing ``x2`` ``[N, in]`` (see the module notes).

    :param douts: the outputs' gradients ``[N, out_i]`` in the model dtype.
    :param need_A: per linear, whether ``dA`` is wanted (likewise ``need_B``, ``need_b``).
    :returns: ``(dx [N, in] or None, dAs, dBs, dbs)``, each list with ``None`` where not wanted.
    """
    dBs, dxa = _backward_small(xa, douts, lws, Bs, need_B)
    dx = _backward_input(douts, dxa, lws, As) if need_x else None
    dAs = _dA(dxa, x2, As, need_A)
    dbs = [_bias_grad(d, lw.bias, nb) for lw, d, nb in zip(lws, douts, need_b)]
    return dx, dAs, dBs, dbs


class LoraSharedInput(torch.autograd.Function):
    """k LoRA linears on one input (q/k/v: k=3; o: k=1).

    ``apply(x, lws, *flat)`` with ``x`` ``[..., in]``, ``lws`` a tuple of :class:`LoraWeights`
    and ``flat`` = ``(A_1, B_1, bias_1, ..., A_k, B_k, bias_k)`` (the same tensors as in ``lws``,
    passed so autograd tracks them). Returns k tensors ``[..., out_i]``. Inside ``torch.compile``
    the custom operators of :mod:`corept_kernels.ops.lora` run the same two functions.
    """

    @staticmethod
    def forward(ctx, x, lws, *flat):
        x2 = x.reshape(-1, x.shape[-1])
        As, Bs = flat[0::3], flat[1::3]
        outs, xa = _forward_shared(x2, lws, As, Bs, x.dtype)
        ctx.save_for_backward(x2, xa, *As, *Bs)
        ctx.lws, ctx.device_type = lws, x.device.type
        ctx.lead = x.shape[:-1]
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)

    @staticmethod
    @autocast_off_backward
    def backward(ctx, *douts):
        x2, xa, *ab = ctx.saved_tensors
        k = len(ctx.lws)
        need = ctx.needs_input_grad
        d2 = [d.reshape(-1, d.shape[-1]).to(x2.dtype) for d in douts]
        dx, dAs, dBs, dbs = shared_backward(d2, x2, xa, ctx.lws, ab[:k], ab[k:], need[0],
                                            need[2::3], need[3::3], need[4::3])
        grads = [None if dx is None else dx.view(*ctx.lead, x2.shape[1]), None]
        for dA, dB, db in zip(dAs, dBs, dbs):
            grads += [dA, dB, db]
        return tuple(grads)
