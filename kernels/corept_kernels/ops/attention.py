"""Varlen attention as torch custom operators (see :mod:`corept_kernels.ops.norms`).

The forward operator returns the output, the base-2 log-sum-exp rows and the schedule the
backward reuses; the fake functions give their shapes (the schedule's from ``T``, the number of
documents and the tile size, which depend on shapes and dtype only).
"""
from __future__ import annotations

import torch

from corept_kernels.attention.varlen_launch import blocks, schedule_rows, varlen_backward, varlen_forward


@torch.library.custom_op("corept_kernels::varlen_attention_fwd", mutates_args=())
def _varlen_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                   window: int | None, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return varlen_forward(q, k, v, cu_seqlens, scale, window, softcap)


@_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens, scale, window, softcap):
    T, Hq, D = q.shape
    rows = schedule_rows(T, cu_seqlens.shape[0] - 1, blocks(D, q.dtype, q.device).tile)
    return (q.new_empty((T, Hq, D)), q.new_empty((Hq, T), dtype=torch.float32),
            cu_seqlens.new_empty((2, rows, 3), dtype=torch.int32))


@torch.library.custom_op("corept_kernels::varlen_attention_bwd", mutates_args=())
def _varlen_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, sched: torch.Tensor, scale: float, window: int | None,
                   softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return varlen_backward(dout, q, k, v, out, lse, sched, scale, window, softcap)


@_varlen_bwd_op.register_fake
def _(dout, q, k, v, out, lse, sched, scale, window, softcap):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup(ctx, inputs, output):
    q, k, v, _, scale, window, softcap = inputs
    out, lse, sched = output
    ctx.save_for_backward(q, k, v, out, lse, sched)
    ctx.options = (scale, window, softcap)


def _varlen_op_backward(ctx, dout, _dlse, _dsched):
    q, k, v, out, lse, sched = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd_op(dout, q, k, v, out, lse, sched, *ctx.options)
    return dq, dk, dv, None, None, None, None


_varlen_fwd_op.register_autograd(_varlen_op_backward, setup_context=_varlen_setup)
