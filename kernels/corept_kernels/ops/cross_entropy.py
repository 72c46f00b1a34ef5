"""Cross-entropy as torch custom operators (see :mod:`corept_kernels.ops.norms`).

The semantic options (:func:`corept_kernels.cross_entropy.kernel_options`) are scalar arguments;
the reduction runs inside the forward operator and the division by ``divisor`` of "mean" inside
the backward one, as in the eager ``autograd.Function``.
"""
from __future__ import annotations

import torch

from corept_kernels.cross_entropy import _ce_backward, _ce_forward, kernel_options


@torch.library.custom_op("corept_kernels::cross_entropy_fwd", mutates_args=())
def _ce_fwd_op(logits: torch.Tensor, labels: torch.Tensor, divisor: torch.Tensor | None, reduction: str,
               ignore_index: int, logit_scale: float, softcap: float | None, label_smoothing: float,
               z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    opts = kernel_options(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                          label_smoothing=label_smoothing, z_loss=z_loss)
    return _ce_forward(logits, labels, opts, reduction, divisor)


@_ce_fwd_op.register_fake
def _(logits, labels, divisor, reduction, ignore_index, logit_scale, softcap, label_smoothing, z_loss):
    N = logits.shape[0]
    out = logits.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    return out, logits.new_empty((N,), dtype=torch.float32)


@torch.library.custom_op("corept_kernels::cross_entropy_bwd", mutates_args=())
def _ce_bwd_op(grad_out: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
               divisor: torch.Tensor | None, reduction: str, ignore_index: int, logit_scale: float,
               softcap: float | None, label_smoothing: float, z_loss: float) -> torch.Tensor:
    opts = kernel_options(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                          label_smoothing=label_smoothing, z_loss=z_loss)
    return _ce_backward(grad_out, logits, labels, lse, opts, reduction, divisor)


@_ce_bwd_op.register_fake
def _(grad_out, logits, labels, lse, divisor, reduction, ignore_index, logit_scale, softcap,
      label_smoothing, z_loss):
    return logits.new_empty(logits.shape)


def _ce_setup(ctx, inputs, output):
    logits, labels, divisor, reduction, *scalars = inputs
    ctx.save_for_backward(logits, labels, output[1], divisor)
    ctx.reduction, ctx.scalars = reduction, scalars


def _ce_op_backward(ctx, grad_out, _dlse):
    logits, labels, lse, divisor = ctx.saved_tensors
    dlogits = _ce_bwd_op(grad_out, logits, labels, lse, divisor, ctx.reduction, *ctx.scalars)
    return dlogits, None, None, None, None, None, None, None, None


_ce_fwd_op.register_autograd(_ce_op_backward, setup_context=_ce_setup)
