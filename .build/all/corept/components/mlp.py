"""Gated-MLP replacement: ``down(act(gate(x)) * up(x))`` with a fused SwiGLU/GeGLU kernel."""
from __future__ import annotations

import torch.nn as nn
from corept_kernels import geglu, swiglu

from corept.architecture import Architecture, Quirks
from corept.components._device import implementation
from corept.replacement import Replacement

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _activation(name: str):
    if name == "swiglu":
        return "swiglu", swiglu
    approximate = "tanh" if name == "geglu_tanh" else "none"
    return "geglu", lambda gate, up: geglu(gate, up, approximate=approximate)


def mlp_replacement(arch: Architecture, quirks: Quirks, module: nn.Module, model: nn.Module) -> Replacement | None:
    """Replace a gated MLP's forward; the module needs ``gate_proj``, ``up_proj``, ``down_proj``.

    Input ``[..., H]`` -> ``[..., H]``; the activation comes from ``quirks.mlp_activation``.
    """
    if not all(isinstance(getattr(module, p, None), nn.Module) for p in _PROJECTIONS):
        return None
    kernel, act = _activation(quirks.mlp_activation)
    impl, reason = implementation(kernel, model)

    def forward(self, x, *args, **kwargs):
        return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))

    return Replacement(implementation=impl, forward=forward, fallback_reason=reason)
