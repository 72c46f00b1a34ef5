"""Pure-torch twin of :mod:`corept_kernels.rope` (same signature and semantics, autograd backward).

Used where the Triton kernel cannot run (CPU without the interpreter, cos/sin that need a
gradient, inside ``torch.compile``). Like the kernel it returns tensors in the layout of its inputs,
and with low-precision ``q``/``k`` and cos/sin of that same dtype (as HF's rotary modules return
them) it rounds where transformers does, forward and backward: it *is* transformers' formula there.
"""
from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    xr = x[..., :rot]
    if x.dtype != torch.float32 and cos.dtype == x.dtype and sin.dtype == x.dtype:
        out = xr * cos + _rotate_half(xr) * sin  # transformers' roundings: each product, then the sum
    else:
        xr = xr.float()
        out = (xr * cos.float() + _rotate_half(xr) * sin.float()).to(x.dtype)
    if rot < x.shape[-1]:
        out = torch.cat((out, x[..., rot:]), dim=-1)
    return torch.empty_like(x).copy_(out)  # x's strides (HF's transposed [B, S, H, D] view included)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary position embedding, rotate-half convention.

    :param q: ``[B, Hq, S, D]``; ``k``: ``[B, Hk, S, D]``.
    :param cos: ``[B, S, Dr]``, ``[1, S, Dr]`` or ``[S, Dr]`` with ``Dr <= D`` even (HF rotary
        embedding output); ``sin`` alike. Only the first ``Dr`` dims rotate, the rest pass through.
    :returns: ``(q_out, k_out)`` with the dtypes, shapes and strides of ``q`` and ``k``: computed in
        ``q``'s dtype with transformers' roundings when cos/sin share that low-precision dtype,
        else in fp32 and rounded once.
    """
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _apply(q, cos, sin), _apply(k, cos, sin)
