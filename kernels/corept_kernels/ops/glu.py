"""The gated activations (SwiGLU, GeGLU) as torch custom operators (see
:mod:`corept_kernels.ops.norms`): one operator pair for all three, ``act`` the activation id of
:mod:`corept_kernels.glu` (0 SiLU, 1 GELU tanh, 2 GELU erf).
"""
from __future__ import annotations

import torch

from corept_kernels.glu import _glu_backward, _glu_forward


@torch.library.custom_op("corept_kernels::glu_fwd", mutates_args=())
def _glu_fwd_op(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    return _glu_forward(gate, up, act)[0]


@_glu_fwd_op.register_fake
def _(gate, up, act):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("corept_kernels::glu_bwd", mutates_args=())
def _glu_bwd_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                act: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _glu_backward(dy, gate, up, act)


@_glu_bwd_op.register_fake
def _(dy, gate, up, act):
    return gate.new_empty(dy.shape), up.new_empty(dy.shape)


def _glu_setup(ctx, inputs, output):
    gate, up, act = inputs
    ctx.save_for_backward(gate, up)
    ctx.act = act


def _glu_op_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = _glu_bwd_op(dy, gate, up, ctx.act)
    return dg, du, None


_glu_fwd_op.register_autograd(_glu_op_backward, setup_context=_glu_setup)
