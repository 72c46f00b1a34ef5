"""RMSNorm replacement: one Triton kernel, parametrized by the declared offset and casting."""
from __future__ import annotations

import inspect

import torch.nn as nn
from corept_kernels import rms_norm

from corept.components import probe
from corept.patching.answers import Keep, Replacement
from corept.patching.sharing import shared
from corept.patching.signature import forward_signature
from corept.registry.quirks import NORM_CASTINGS

_EPS_ATTRS = ("variance_epsilon", "eps")


def single_input(module: nn.Module) -> str | None:
    """Why ``module.forward`` is not ``forward(x)`` (one positional input, nothing else), or ``None``."""
    params = list(forward_signature(module).parameters.values())
    if len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return None
    return (f"{type(module).__name__}.forward{forward_signature(module)} takes more than one input; the shared "
            f"component replaces forward(x) only")


def _norm_forward(eps_attr: str, offset: float, casting: str):
    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, getattr(self, eps_attr), offset=offset, casting=casting)
    return forward


def norm_replacement(arch, module: nn.Module, model: nn.Module) -> Replacement | Keep:
    """Replace an RMSNorm's forward with ``corept_kernels.rms_norm`` (``[..., H]`` -> ``[..., H]``).

    The module needs ``weight`` ``[H]`` and a float epsilon (``variance_epsilon`` or ``eps``);
    numerics per ``arch.numerics.norm_offset`` / ``norm_casting``, proven on a probe.
    """
    cls = type(module).__name__
    eps_attr = next((n for n in _EPS_ATTRS if isinstance(getattr(module, n, None), float)), None)
    if eps_attr is None:
        return Keep(f"{cls} has no float {' or '.join(_EPS_ATTRS)} attribute (the shared RMSNorm reads one)")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return Keep(f"{cls}.weight is not a 1-D parameter (the shared RMSNorm scales by one)")
    why = single_input(module)
    if why:
        return Keep(why)
    offset, casting = float(arch.numerics.norm_offset), arch.numerics.norm_casting
    if casting not in NORM_CASTINGS:
        return Keep(f"norm_casting {casting!r} is not one of {NORM_CASTINGS}")

    forward = shared(("rms_norm", eps_attr, offset, casting), lambda: _norm_forward(eps_attr, offset, casting))
    replacement = Replacement(kernel="rms_norm", forward=forward)
    make = lambda: (probe.randn(2, 3, weight.shape[0], dtype=weight.dtype, device=weight.device),)  # noqa: E731
    return probe.checked(arch, "norm", module, replacement, make,
                         hint=f"norm_offset={offset:g} and norm_casting={casting!r} (Numerics)")
