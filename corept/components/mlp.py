"""Gated-MLP replacement: ``down(act(gate(x)) * up(x))`` with a fused SwiGLU/GeGLU kernel.

The linears are named by ``arch.projections``: separate ``gate``/``up`` or one ``gate_up`` whose
output is split in halves (gate first). The activation is ``arch.numerics.mlp_activation`` (by
default read from the config).
"""
from __future__ import annotations

import torch.nn as nn
from corept_kernels import geglu, swiglu

from corept.components import probe
from corept.components.norm import single_input
from corept.patching.answers import Keep, Replacement
from corept.patching.sharing import shared
from corept.registry.quirks import MLP_ACTIVATIONS


def glu(activation: str):
    """``(kernel name, fn(gate, up))`` computing ``act(gate) * up`` for a declared activation."""
    if activation == "swiglu":
        return "swiglu", swiglu
    approximate = "tanh" if activation == "geglu_tanh" else "none"
    return "geglu", lambda gate, up: geglu(gate, up, approximate=approximate)


def linears(module: nn.Module, names) -> str | None:
    """Why ``module`` lacks one of the linear layers ``names``, or ``None``."""
    missing = [n for n in names if not isinstance(getattr(module, n, None), nn.Module)]
    if not missing:
        return None
    present = sorted(n for n, c in module.named_children() if "Linear" in type(c).__name__)
    return (f"{type(module).__name__} has no {', '.join(missing)} (declared projections); its linear layers are "
            f"{present}: declare them with corept.Projections")


def _mlp_forward(activation: str, names: tuple, gate_up: bool):
    act = glu(activation)[1]
    if gate_up:
        fused, down = names

        def forward(self, x):
            return getattr(self, down)(act(*getattr(self, fused)(x).chunk(2, dim=-1)))
    else:
        gate, up, down = names

        def forward(self, x):
            return getattr(self, down)(act(getattr(self, gate)(x), getattr(self, up)(x)))
    return forward


def mlp_replacement(arch, module: nn.Module, model: nn.Module) -> Replacement | Keep:
    """Replace a gated MLP's forward: input ``[..., H]`` -> ``[..., H]``, proven on a probe."""
    p = arch.projections
    activation = arch.numerics.mlp_activation
    if activation not in MLP_ACTIVATIONS:
        return Keep(f"activation {activation!r} has no corept gated kernel (kernels: {', '.join(MLP_ACTIVATIONS)})")
    names = (p.gate_up, p.down) if p.gate_up else (p.gate, p.up, p.down)
    why = linears(module, names) or single_input(module)
    if why:
        return Keep(why)
    kernel = glu(activation)[0]
    forward = shared(("mlp", activation, names, bool(p.gate_up)), lambda: _mlp_forward(activation, names, bool(p.gate_up)))
    replacement = Replacement(kernel=kernel, forward=forward)
    hidden = getattr(getattr(module, names[0]), "in_features", None)
    if hidden is None:
        return Keep(f"{type(module).__name__}.{names[0]} has no in_features")
    dtype, device = probe.compute_dtype(module, model), next(module.parameters()).device
    make = lambda: (probe.randn(1, 3, hidden, dtype=dtype, device=device),)  # noqa: E731
    return probe.checked(arch, "mlp", module, replacement, make,
                         hint=f"mlp_activation={activation!r} and projections {names} (gate first)")
