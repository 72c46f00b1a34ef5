"""Fused lm_head + cross-entropy as torch custom operators (see :mod:`corept_kernels.ops.norms`).

An operator cannot see which inputs need gradients, so the forward takes them as ``need_h``,
``need_w``, ``need_b``. On the fast path (:func:`corept_kernels.fused_linear_ce._is_fast`) it
returns the gradients of the loss as extra outputs, saved for backward, where
``fused_linear_ce_fast_bwd`` multiplies them by the upstream gradient: grad_hidden
``[N, H]`` (hidden's dtype), grad_weight ``[V, H]`` fp32, grad_bias ``[V]`` fp32, each a one-element
placeholder when not computed (:func:`~corept_kernels.ops.common.unused`). Otherwise it saves ``lse`` and ``fused_linear_ce_bwd``
recomputes each chunk's logits. The same functions as the eager ``autograd.Function`` do the work.
Unlike the eager form, the fp32 grad_weight is freed only after its cast copy is whole (the eager
form frees it slice by slice), and the scaled grad_hidden is a new buffer, not the saved one.
"""
from __future__ import annotations

import torch

from corept_kernels.cross_entropy import kernel_options
from corept_kernels.ops.common import unused
from corept_kernels.fused_linear_ce import _backward, _forward, _is_fast, _scale_grads


def _or_empty(t: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return unused(like, dtype) if t is None else t


@torch.library.custom_op("corept_kernels::fused_linear_ce_fwd", mutates_args=())
def _flce_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                 divisor: torch.Tensor | None, reduction: str, ignore_index: int, logit_scale: float,
                 softcap: float | None, label_smoothing: float, z_loss: float, return_lp: bool, chunk: int,
                 need_h: bool, need_w: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = kernel_options(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                          label_smoothing=label_smoothing, z_loss=z_loss)
    with torch.autocast(hidden.device.type, enabled=False):  # an operator runs under the caller's autocast
        out, lp, lse, grads = _forward(hidden, weight, bias, labels, opts, reduction, divisor, return_lp,
                                       chunk, (need_h, need_w, need_b), whole_w=True)
    gh, gw, gb = (None, None, None) if grads is None else grads.unscaled()
    f32 = torch.float32
    return (out, _or_empty(lp, hidden, f32), lse, _or_empty(gh, hidden, hidden.dtype),
            _or_empty(gw, hidden, f32), _or_empty(gb, hidden, f32))


@_flce_fwd_op.register_fake
def _(hidden, weight, bias, labels, divisor, reduction, ignore_index, logit_scale, softcap,
      label_smoothing, z_loss, return_lp, chunk, need_h, need_w, need_b):
    N = hidden.shape[0]
    fast = _is_fast((need_h, need_w, need_b), reduction, return_lp)

    def f32(shape):
        return hidden.new_empty(shape, dtype=torch.float32)
    return (f32((N,) if reduction == "none" else ()), f32((N,) if return_lp else (1,)), f32((N,)),
            hidden.new_empty(hidden.shape if fast and need_h else (1,)),
            f32(weight.shape if fast and need_w else (1,)), f32(bias.shape if fast and need_b else (1,)))


@torch.library.custom_op("corept_kernels::fused_linear_ce_fast_bwd", mutates_args=())
def _fast_bwd_op(g: torch.Tensor, gh: torch.Tensor, gw: torch.Tensor, gb: torch.Tensor, w_dtype: torch.dtype,
              b_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _scale_grads(g, gh, gw, gb, w_dtype, b_dtype)


@_fast_bwd_op.register_fake
def _(g, gh, gw, gb, w_dtype, b_dtype):
    return torch.empty_like(gh), gw.new_empty(gw.shape, dtype=w_dtype), gb.new_empty(gb.shape, dtype=b_dtype)


@torch.library.custom_op("corept_kernels::fused_linear_ce_bwd", mutates_args=())
def _flce_bwd_op(g_loss: torch.Tensor | None, g_lp: torch.Tensor | None, hidden: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, lse: torch.Tensor,
                 divisor: torch.Tensor | None, reduction: str, ignore_index: int, logit_scale: float,
                 softcap: float | None, label_smoothing: float, z_loss: float, chunk: int, need_h: bool,
                 need_w: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = kernel_options(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                          label_smoothing=label_smoothing, z_loss=z_loss)
    with torch.autocast(hidden.device.type, enabled=False):
        gh, gw, gb = _backward(g_loss, g_lp, hidden, weight, bias, labels, lse, divisor, opts, reduction,
                               chunk, (need_h, need_w, need_b))
    return (_or_empty(gh, hidden, hidden.dtype), _or_empty(gw, weight, weight.dtype),
            _or_empty(gb, weight, weight.dtype if bias is None else bias.dtype))


@_flce_bwd_op.register_fake
def _(g_loss, g_lp, hidden, weight, bias, labels, lse, divisor, reduction, ignore_index, logit_scale,
      softcap, label_smoothing, z_loss, chunk, need_h, need_w, need_b):
    return (hidden.new_empty(hidden.shape if need_h else (1,)), weight.new_empty(weight.shape if need_w else (1,)),
            weight.new_zeros((1,)) if bias is None else bias.new_empty(bias.shape if need_b else (1,)))


def _flce_setup(ctx, inputs, output):
    hidden, weight, bias, labels, divisor, reduction, *scalars = inputs
    *ctx.scalars, ctx.return_lp, ctx.chunk, need_h, need_w, need_b = scalars
    ctx.need = (need_h, need_w, need_b)
    ctx.fast, ctx.reduction = _is_fast(ctx.need, reduction, ctx.return_lp), reduction
    if ctx.fast:
        ctx.save_for_backward(*output[3:])
        ctx.dtypes = (weight.dtype, torch.float32 if bias is None else bias.dtype)
    else:
        ctx.save_for_backward(hidden, weight, bias, labels, output[2], divisor)


def _flce_op_backward(ctx, g_loss, g_lp, *_unused):
    if ctx.fast:
        if g_loss is None:
            return (None,) * 16
        gh, gw, gb = _fast_bwd_op(g_loss, *ctx.saved_tensors, *ctx.dtypes)
        need = ctx.need
    else:
        hidden, weight, bias, labels, lse, divisor = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        # without return_lp the log-prob output is an empty placeholder: its gradient means nothing
        gh, gw, gb = _flce_bwd_op(g_loss, g_lp if ctx.return_lp else None, hidden, weight, bias, labels, lse,
                                  divisor, ctx.reduction, *ctx.scalars, ctx.chunk, *need)
    return (gh if need[0] else None, gw if need[1] else None, gb if need[2] else None) + (None,) * 13


_flce_fwd_op.register_autograd(_flce_op_backward, setup_context=_flce_setup)
