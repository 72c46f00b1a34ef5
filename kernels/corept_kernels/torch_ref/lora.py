"""Pure-torch twins of :mod:`corept_kernels.lora`: plain autograd composition, same semantics.

Each LoRA linear is ``F.linear(x, W) + scaling * F.linear(F.linear(x, A), B) (+ bias)`` with the
base weight (dequantized if 4-bit; its row window for a part of a fused projection) detached and
every operand cast to ``x.dtype``; the two row windows of one fused ``gate_up`` linear run as that
one linear, its output split (as the model does). Autograd saves whatever it needs (more than the
fused versions); use these as fallbacks and test references.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from corept_kernels.lora.weights import LoraWeights, split_whole


def lora_linear(x: torch.Tensor, lw: LoraWeights) -> torch.Tensor:
    """``x W^T + scaling * (x A^T) B^T (+ bias)``: ``x`` ``[..., in]`` -> ``[..., out]``."""
    dt = x.dtype
    y = F.linear(x, lw.dense_weight(dt), None if lw.bias is None else lw.bias.to(dt))
    return y + lw.scaling * F.linear(F.linear(x, lw.A.to(dt)), lw.B.to(dt))


def _act(e: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        return F.silu(e)
    if activation == "geglu_tanh":
        return F.gelu(e, approximate="tanh")
    if activation == "geglu":
        return F.gelu(e)
    raise ValueError(f"activation must be one of ('swiglu', 'geglu_tanh', 'geglu'), got {activation!r}")


def lora_mlp(x: torch.Tensor, gate: LoraWeights, up: LoraWeights, down: LoraWeights,
             activation: str = "swiglu", tile_rows: int | None = None) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``: ``x`` ``[..., H]`` -> ``[..., O]``.

    ``tile_rows`` is accepted for signature parity with the fused path; unused here.
    """
    del tile_rows
    found = split_whole((gate, up))
    if found is None:
        e, g = lora_linear(x, gate), lora_linear(x, up)
    else:  # one gate_up linear [..., 2F], split in its output columns
        whole, (gate_cols, up_cols) = found
        y = lora_linear(x, whole)
        e, g = y[..., gate_cols], y[..., up_cols]
    return lora_linear(_act(e, activation) * g, down)


def lora_qkv(x: torch.Tensor, q: LoraWeights, k: LoraWeights, v: LoraWeights
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q(x), k(x), v(x))``: ``x`` ``[..., H]`` -> ``[..., Hq]``, ``[..., Hkv]``, ``[..., Hkv]``."""
    return lora_linear(x, q), lora_linear(x, k), lora_linear(x, v)


def lora_o(x: torch.Tensor, o: LoraWeights) -> torch.Tensor:
    """``o(x)``: ``x`` ``[..., Hq]`` -> ``[..., H]``."""
    return lora_linear(x, o)
