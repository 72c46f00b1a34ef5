"""Pure-torch twins of :mod:`corept_kernels.glu` (same signatures and semantics, autograd)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

GELU_APPROXIMATIONS = ("tanh", "none")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in fp32; ``gate``, ``up``: ``[..., N]``; result in their
    promoted dtype."""
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    return (F.silu(gate.float()) * up.float()).to(out_dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` computed in fp32; ``approximate`` is ``"tanh"`` (the tanh
    approximation, HF's ``gelu_pytorch_tanh``) or ``"none"`` (the exact erf form)."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    return (F.gelu(gate.float(), approximate=approximate) * up.float()).to(out_dtype)
