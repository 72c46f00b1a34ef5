"""Rotary embedding as torch custom operators (see :mod:`corept_kernels.ops.norms`).

The outputs have the inputs' layout (``empty_like``, memory format preserved), so the fake
functions use ``torch.empty_like`` too: a compiled graph sees the strides the kernel writes.
"""
from __future__ import annotations

import torch

from corept_kernels.rope import _grad_or_zeros, _rope_backward, _rope_forward


@torch.library.custom_op("corept_kernels::rope_fwd", mutates_args=())
def _rope_fwd_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_forward(q, k, cos, sin)


@_rope_fwd_op.register_fake
def _(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("corept_kernels::rope_bwd", mutates_args=())
def _rope_bwd_op(dqo: torch.Tensor, dko: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_backward(dqo, dko, cos, sin)


@_rope_bwd_op.register_fake
def _(dqo, dko, cos, sin):
    return torch.empty_like(dqo), torch.empty_like(dko)


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.q_meta, ctx.k_meta = (q.shape, q.dtype), (k.shape, k.dtype)


def _rope_op_backward(ctx, dqo, dko):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_bwd_op(_grad_or_zeros(dqo, ctx.q_meta, cos.device),
                          _grad_or_zeros(dko, ctx.k_meta, cos.device), cos, sin)
    return dq, dk, None, None


_rope_fwd_op.register_autograd(_rope_op_backward, setup_context=_rope_setup)
