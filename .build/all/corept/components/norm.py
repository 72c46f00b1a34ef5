"""RMSNorm replacement: one Triton kernel, parametrized by the declared offset and casting."""
from __future__ import annotations

import torch.nn as nn
from corept_kernels import rms_norm

from corept.architecture import Architecture, Quirks
from corept.components._device import implementation
from corept.replacement import Replacement

_EPS_ATTRS = ("variance_epsilon", "eps")


def _eps_attr(module: nn.Module) -> str | None:
    for name in _EPS_ATTRS:
        if isinstance(getattr(module, name, None), float):
            return name
    return None


def norm_replacement(arch: Architecture, quirks: Quirks, module: nn.Module, model: nn.Module) -> Replacement | None:
    """Replace an RMSNorm's forward with ``corept_kernels.rms_norm``.

    The module must hold ``weight`` ``[H]`` and a float epsilon (``variance_epsilon`` or ``eps``).
    Input ``[..., H]`` -> output ``[..., H]``, numerics per ``quirks.norm_casting``.
    """
    eps_attr = _eps_attr(module)
    weight = getattr(module, "weight", None)
    if eps_attr is None or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return None
    offset, casting = float(quirks.norm_offset), quirks.norm_casting
    impl, reason = implementation("rms_norm", model)

    def forward(self, hidden_states, *args, **kwargs):
        return rms_norm(hidden_states, self.weight, getattr(self, eps_attr), offset=offset, casting=casting)

    return Replacement(implementation=impl, forward=forward, fallback_reason=reason)
