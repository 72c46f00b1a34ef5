"""The norms as torch custom operators: the form ``torch.compile`` traces.

Each kernel is a forward and a backward operator with fake (shape-only) functions and the forward's
autograd formula registered, so Dynamo records one opaque node per call instead of breaking the
graph at a Triton launch. They run the same launch functions as the eager ``autograd.Function`` s
of :mod:`corept_kernels.norms`. Unused gradients come back as one-element placeholders
(:mod:`corept_kernels.ops.common`: an operator returns tensors, never ``None``).
"""
from __future__ import annotations

import torch

from corept_kernels.ops.common import unused
from corept_kernels.norms import _ln_backward, _ln_forward, _rms_backward, _rms_forward
from corept_kernels.torch_ref.norms import rms_norm_out_dtype


@torch.library.custom_op("corept_kernels::rms_norm_fwd", mutates_args=())
def _rms_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                casting: str) -> tuple[torch.Tensor, torch.Tensor]:
    y, rstd = _rms_forward(x, weight, eps, offset, casting)
    return y.view(x.shape), rstd


@_rms_fwd_op.register_fake
def _(x, weight, eps, offset, casting):
    rows = x.numel() // x.shape[-1]
    return x.new_empty(x.shape, dtype=rms_norm_out_dtype(x, weight, casting)), x.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("corept_kernels::rms_norm_bwd", mutates_args=())
def _rms_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                casting: str, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = _rms_backward(dy, x, weight, rstd, offset, casting, need_dw)
    return dx.view(x.shape), (dw if need_dw else unused(weight))


@_rms_bwd_op.register_fake
def _(dy, x, weight, rstd, offset, casting, need_dw):
    return torch.empty_like(x), weight.new_empty(weight.shape if need_dw else (1,))


def _rms_setup(ctx, inputs, output):
    x, weight, _, offset, casting = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset, ctx.casting = offset, casting


def _rms_op_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    dx, dw = _rms_bwd_op(dy, x, weight, rstd, ctx.offset, ctx.casting, need_dw)
    return dx, (dw if need_dw else None), None, None, None


_rms_fwd_op.register_autograd(_rms_op_backward, setup_context=_rms_setup)


@torch.library.custom_op("corept_kernels::layer_norm_fwd", mutates_args=())
def _ln_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd = _ln_forward(x, weight, bias, eps)
    return y.view(x.shape), mean, rstd


@_ln_fwd_op.register_fake
def _(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    return torch.empty_like(x), x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("corept_kernels::layer_norm_bwd", mutates_args=())
def _ln_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
               need_dw: bool, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _ln_backward(dy, x, weight, mean, rstd, need_dw, None if bias is None else bias.dtype)
    return dx.view(x.shape), (unused(weight) if dw is None else dw), (unused(weight) if db is None else db)


@_ln_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, need_dw, bias):
    return (torch.empty_like(x), weight.new_empty(weight.shape if need_dw else (1,)),
            unused(weight) if bias is None else torch.empty_like(bias))


def _ln_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight, output[1], output[2], bias)


def _ln_op_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db = _ln_bwd_op(dy, x, weight, mean, rstd, need[1], bias if need[2] else None)
    return dx, (dw if need[1] else None), (db if need[2] else None), None


_ln_fwd_op.register_autograd(_ln_op_backward, setup_context=_ln_setup)
