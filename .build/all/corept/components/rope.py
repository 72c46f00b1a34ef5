"""RoPE replacement: q and k rotated by one Triton launch, scoped to one attention instance.

Transformers' attention forwards call the module global ``apply_rotary_pos_emb``. Rebinding that
global would change every model in the process, so instead the instance's forward is cloned with a
private globals dict in which the name points to :func:`apply_rotary_pos_emb` below.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from corept_kernels import rope

from corept.architecture import Architecture, Quirks
from corept.components._device import implementation
from corept.replacement import Replacement

ROPE_GLOBAL = "apply_rotary_pos_emb"


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1, *args, **kwargs):
    """Drop-in for transformers' ``apply_rotary_pos_emb``.

    :param q: ``[B, Hq, S, D]``; :param k: ``[B, Hk, S, D]``; :param cos, sin: ``[B, S, Dr]``.
    Other layouts (``unsqueeze_dim=2``: ``[B, S, H, D]``) are transposed to the kernel's layout.
    """
    if unsqueeze_dim == 2:
        qo, ko = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return qo.transpose(1, 2), ko.transpose(1, 2)
    return rope(q, k, cos, sin)


def rope_replacement(arch: Architecture, quirks: Quirks, module: nn.Module, model: nn.Module) -> Replacement | None:
    """Rebind ``apply_rotary_pos_emb`` for this attention instance's forward only.

    Returns ``None`` when the attention forward does not use that global (nothing to replace).
    """
    fn = getattr(type(module).forward, "__wrapped__", type(module).forward)
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    if ROPE_GLOBAL not in getattr(fn, "__code__", None).co_names:
        return None
    impl, reason = implementation("rope", model)
    return Replacement(implementation=impl, forward_globals={ROPE_GLOBAL: apply_rotary_pos_emb},
                       fallback_reason=reason)
