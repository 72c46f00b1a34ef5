"""The fused LoRA MLP ``y = down(act(gate(x)) * up(x))``: one autograd node, hand-derived backward.

Notation and rounding rule: :mod:`corept_kernels.lora.autograd` (every value is rounded where
peft rounds it). The linears on ``x`` are either

* **two linears**, ``gate`` and ``up`` (``W`` ``[F, H]`` each), run as peft runs two LoRA linears
  sharing an input: one base product and one branch each, ``dx`` accumulated over both in
  autograd's order (:mod:`corept_kernels.lora.autograd`); or
* **one linear** ``gate_up`` (``W`` ``[2F, H]``, ``A`` ``[r, H]``, ``B`` ``[2F, r]``) whose output
  columns are gate's and up's (``gate, up = y.chunk(2, -1)``: the caller passes the two row windows
  of :meth:`~corept_kernels.lora.weights.LoraWeights.row_split`, recognised by
  :func:`~corept_kernels.lora.weights.split_whole`), run as peft runs that one linear: forward one
  ``[N, 2F]`` base product (a 4-bit base dequantized once), one ``x A^T``, one branch add; the
  gated activation reads the two column halves in place. Backward: the GLU backward writes
  ``d_gate`` and ``d_up`` into the halves of that same ``[N, 2F]`` buffer, which is then
  ``dy_gu = cat(d_gate, d_up)``, and one ``dxa = s dy_gu B`` (over ``2F``), one ``dA``, one ``dB``
  and one base product ``dy_gu W`` (over ``2F``) follow: ``dx = round(round(dxa A) + dy_gu W)``,
  the product rounded as its GEMM's output. Rounding the halves as two linears instead (two base
  products and two branches, each rounded, then summed) drew an independent bf16 error sample for
  ``dx`` and put upstream LoRA gradients of a fused-``gate_up`` model (Phi-3) above the bf16
  rule's bound.

What is saved for backward (activations; parameters are referenced, not copied): ``x``, the
gate/up projections (``e``, ``g`` ``[N, F]`` each, or the one ``[N, 2F]`` output whose halves
they are: the same bytes) and the small ``xa`` products (``[N, r_g + r_u]`` or ``[N, r]``, and
``[N, r_d]``). peft also saves ``act(e)`` and ``h = act(e) * g`` (two more ``[N, F]``), plus fp32
copies of ``x`` and ``h`` under fp32 adapters. ``h`` is recomputed in backward by the fused
activation kernel, which overwrites ``e``/``g``/``dh`` in place (so a second backward through the
same graph, ``retain_graph=True``, fails loudly on the version check). The backward's working set
beyond the saved tensors is ``dh`` (``[N, F]``, in row chunks under fp32 adapters, overwritten in
place by ``h``) plus chunk-sized temporaries; ``dx`` starts from the first base product.

Measured (saved bytes, parameters excluded): Llama-3.1-8B MLP, 4x2048 tokens, r 16, bf16 adapters:
512.75 MiB vs peft's 960.75 MiB.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from corept_kernels.lora.activation import glu_backward_, glu_forward
from corept_kernels.lora.autograd import (_backward_input, _backward_small, _bias_grad, _dA, _forward_shared,
                                          autocast_off_backward)
from corept_kernels.lora.chunks import product_rows
from corept_kernels.lora.weights import LoraWeights, split_whole


class MlpLinears(NamedTuple):
    """The LoRA linears of one MLP as :class:`LoraMLP` runs them.

    :param front: the linears on ``x``: ``(gate, up)``, or ``(gate_up,)`` for one linear whose
        output ``[N, 2F]`` holds gate's and up's outputs in the columns ``cols``.
    :param down: ``W`` ``[O, F]``.
    :param cols: ``None`` for two linears, else ``(gate's columns, up's columns)`` of ``gate_up``'s
        output.
    """

    front: tuple[LoraWeights, ...]
    down: LoraWeights
    cols: tuple[slice, slice] | None = None

    @property
    def linears(self) -> tuple[LoraWeights, ...]:
        """Every linear, in the order of the Function's ``(A, B, bias)`` triples."""
        return (*self.front, self.down)


def mlp_linears(gate: LoraWeights, up: LoraWeights, down: LoraWeights) -> MlpLinears:
    """:class:`MlpLinears` of an MLP: one ``gate_up`` linear when ``gate`` and ``up`` are the two
    row windows of one (:func:`~corept_kernels.lora.weights.split_whole`), else two linears."""
    found = split_whole((gate, up))
    if found is None:
        return MlpLinears((gate, up), down)
    whole, (gate_cols, up_cols) = found
    return MlpLinears((whole,), down, (gate_cols, up_cols))


def _down_and_glu_backward_(dy2, dxa_d, e, g, down: LoraWeights, Ad, activation: str, need_dA: bool):
    """The MLP backward from ``dy`` ``[N, O]`` to the gate/up gradients, in row chunks; returns
    ``dA`` of down (``[r_d, F]``, or ``None`` when not needed).

    Per chunk of rows: ``dh = dy W_down + dxa_d A_down`` (``[rows, F]``), then the GLU backward in
    place (``dh`` <- ``h``, ``e`` <- ``de``, ``g`` <- ``dg``; ``e``, ``g`` may be the column halves
    of one ``[N, 2F]`` buffer), then ``h``'s share of ``dA_down``; the ``h`` chunk is dropped
    before the next. Chunks hold at most :data:`~corept_kernels.lora.chunks.CHUNK_BYTES` of ``dh``
    (Llama-3.1-8B: two chunks at 2x2048 tokens, four at 1x8192), so the only whole ``[N, F]``
    buffers live in this phase are the saved ``e`` and ``g``. Rows are independent here but for
    ``dA_down``, summed over the chunks in fp32; with adapters in a 16-bit dtype (whose chunk sums
    would be rounded) the phase runs whole. A 4-bit ``W_down`` is dequantized once for all chunks.
    """
    n = dy2.shape[0]
    fp32_branch = dxa_d.dtype in (torch.float32, torch.float64)
    rows = product_rows(n, e.shape[1], e.dtype.itemsize) if fp32_branch else [slice(0, n)]
    weights = (down.dense_weight(dy2.dtype),) if len(rows) > 1 else None
    dAd = None
    for sl in rows:
        h = _backward_input((dy2[sl],), dxa_d[sl], (down,), (Ad,), weights)  # dh, then (in place) h
        glu_backward_(h, e[sl], g[sl], activation)
        (part,) = _dA(dxa_d[sl], h, (Ad,), (need_dA,))
        del h  # the only reference: the buffer is free before the next chunk and the gate/up phase
        dAd = part if dAd is None else dAd.add_(part)
    return dAd


def _gate_and_up(lin: MlpLinears, outs):
    """``(e, g)`` ``[N, F]`` from the front linears' outputs: theirs, or ``gate_up``'s column halves."""
    if lin.cols is None:
        return outs
    return outs[0][:, lin.cols[0]], outs[0][:, lin.cols[1]]


def mlp_forward(x2: torch.Tensor, activation: str, lin: MlpLinears, As, Bs):
    """``(y [N, O], xa_f, xa_d, outs)``: the MLP of ``x2`` ``[N, H]`` and what its backward needs
    (``xa`` of the front linears ``[N, sum r]`` and of down ``[N, r_d]``, and the front linears'
    outputs: ``(e, g)`` ``[N, F]`` each, or gate_up's ``[N, 2F]``). ``As``/``Bs``: the adapters
    of ``lin.linears``, in order."""
    dt, k = x2.dtype, len(lin.front)
    outs, xa_f = _forward_shared(x2, lin.front, As[:k], Bs[:k], dt)
    h = glu_forward(*_gate_and_up(lin, outs), activation)
    (y,), xa_d = _forward_shared(h, (lin.down,), As[k:], Bs[k:], dt)
    return y, xa_f, xa_d, outs


def mlp_backward(dy2, x2, xa_f, xa_d, outs, activation: str, lin: MlpLinears, As, Bs, need_x: bool,
                 need_A, need_B, need_b):
    """The MLP's backward from ``dy2`` ``[N, O]`` (model dtype). ``outs`` (saved by
    :func:`mlp_forward`) are overwritten in place by their own gradients.

    :param need_A: per linear of ``lin.linears``, whether its ``dA`` is wanted (likewise
        ``need_B``, ``need_b``).
    :returns: ``(dx [N, H] or None, dAs, dBs, dbs)`` per linear of ``lin.linears``, ``None``
        where not wanted.
    """
    k = len(lin.front)
    e, g = _gate_and_up(lin, outs)
    (dBd,), dxa_d = _backward_small(xa_d, (dy2,), (lin.down,), (Bs[k],), (need_B[k],))
    dbd = _bias_grad(dy2, lin.down.bias, need_b[k])
    if not (need_x or any(need_A[:k]) or any(need_B[:k]) or any(need_b[:k])):
        h = glu_forward(e, g, activation)
        (dAd,) = _dA(dxa_d, h, (As[k],), (need_A[k],))
        del h
        return None, [None] * k + [dAd], [None] * k + [dBd], [None] * k + [dbd]
    dAd = _down_and_glu_backward_(dy2, dxa_d, e, g, lin.down, As[k], activation, need_A[k])
    douts = outs  # overwritten in place: (de, dg), or gate_up's dy = [de | dg]
    dBs, dxa_f = _backward_small(xa_f, douts, lin.front, Bs[:k], need_B[:k])
    dbs = [_bias_grad(d, lw.bias, nb) for d, lw, nb in zip(douts, lin.front, need_b[:k])]
    dx = _backward_input(douts, dxa_f, lin.front, As[:k]) if need_x else None
    dAs = _dA(dxa_f, x2, As[:k], need_A[:k])
    return dx, [*dAs, dAd], [*dBs, dBd], [*dbs, dbd]


class LoraMLP(torch.autograd.Function):
    """``y = down(act(gate(x)) * up(x))``, each a LoRA linear, or ``gate``/``up`` one linear.

    ``apply(x, activation, lin, *flat)`` with ``x`` ``[..., H]``, ``lin`` an :class:`MlpLinears`
    and ``flat`` the ``(A, B, bias)`` triples of ``lin.linears`` (the same tensors, passed so
    autograd tracks them). Returns ``[..., O]``. Inside ``torch.compile`` the custom operators of
    :mod:`corept_kernels.ops.lora` run :func:`mlp_forward` and :func:`mlp_backward`.
    """

    @staticmethod
    def forward(ctx, x, activation, lin: MlpLinears, *flat):
        x2 = x.reshape(-1, x.shape[-1])
        As, Bs = flat[0::3], flat[1::3]
        y, xa_f, xa_d, outs = mlp_forward(x2, activation, lin, As, Bs)
        ctx.save_for_backward(x2, xa_f, xa_d, *outs, *As, *Bs)
        ctx.lin, ctx.activation, ctx.lead, ctx.device_type = lin, activation, x.shape[:-1], x.device.type
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @autocast_off_backward
    def backward(ctx, dy):
        lin = ctx.lin
        k = len(lin.front)
        x2, xa_f, xa_d, *rest = ctx.saved_tensors
        outs, As, Bs = rest[:k], rest[k:2 * k + 1], rest[2 * k + 1:]
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        dx, dAs, dBs, dbs = mlp_backward(dy2, x2, xa_f, xa_d, outs, ctx.activation, lin, As, Bs, need[0],
                                         need[3::3], need[4::3], need[5::3])
        grads = [None if dx is None else dx.view(*ctx.lead, x2.shape[1]), None, None]
        for dA, dB, db in zip(dAs, dBs, dbs):
            grads += [dA, dB, db]
        return tuple(grads)
