"""Pure-torch twin of :mod:`corept_kernels.rope` (same signature and semantics, autograd backward)."""
from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    xr = x[..., :rot].float()
    out = xr * cos + _rotate_half(xr) * sin
    if rot < x.shape[-1]:
        out = torch.cat((out, x[..., rot:].float()), dim=-1)
    return out.to(x.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary position embedding, rotate-half convention, computed in fp32.

    :param q: ``[B, Hq, S, D]``; ``k``: ``[B, Hk, S, D]``.
    :param cos: ``[B, S, Dr]``, ``[1, S, Dr]`` or ``[S, Dr]`` with ``Dr <= D`` even (HF rotary
        embedding output); ``sin`` alike. Only the first ``Dr`` dims rotate, the rest pass through.
    :returns: ``(q_out, k_out)`` with the dtypes and shapes of ``q`` and ``k``.
    """
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.float(), sin.float()
    return _apply(q, cos, sin), _apply(k, cos, sin)
