"""The fused LoRA paths' inner kernels as torch custom operators.

The gated activation (:mod:`corept_kernels.lora.activation`) and the rank-r add
(:mod:`corept_kernels.lora.rank_add`) run inside the LoRA operators of
:mod:`corept_kernels.ops.lora`, where Dynamo never sees them; these forms serve code that calls
them directly inside a compiled region. The in-place ones declare what they overwrite, so
functionalization copies what must survive (inductor re-inplaces where nothing does).
"""
from __future__ import annotations

import torch

from corept_kernels.lora.activation import _glu_backward_triton_, _glu_forward_triton
from corept_kernels.lora.rank_add import rank_add_group_triton_


@torch.library.custom_op("corept_kernels::lora_glu", mutates_args=())
def _glu(e: torch.Tensor, g: torch.Tensor, activation: str) -> torch.Tensor:
    return _glu_forward_triton(e, g, activation)


@_glu.register_fake
def _(e, g, activation):
    return e.new_empty(e.shape)


@torch.library.custom_op("corept_kernels::lora_glu_backward_", mutates_args=("dh", "e", "g"))
def _glu_backward(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, activation: str) -> None:
    _glu_backward_triton_(dh, e, g, activation)


@torch.library.custom_op("corept_kernels::rank_add_", mutates_args=("ys",))
def _rank_add(ys: list[torch.Tensor], us: list[torch.Tensor], vs: list[torch.Tensor], scalings: list[float],
              round_first: bool) -> None:
    rank_add_group_triton_(list(zip(ys, us, vs, scalings)), round_first)
