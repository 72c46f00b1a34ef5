"""Pure-torch twins of :mod:`corept_kernels.norms` (same signatures and semantics, autograd backward)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

CASTING_MODES = ("scale_after_cast", "scale_in_fp32", "none")


def rms_norm_out_dtype(x: torch.Tensor, weight: torch.Tensor, casting: str) -> torch.dtype:
    """Output dtype: ``promote(weight, x)`` for ``"scale_after_cast"``, ``x.dtype`` otherwise."""
    if casting == "scale_after_cast":
        return torch.promote_types(weight.dtype, x.dtype)
    return x.dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0,
             casting: str = "scale_after_cast") -> torch.Tensor:
    """RMSNorm over the last dimension.

    :param x: ``[..., H]``.
    :param weight: ``[H]``; the scale is ``offset + weight``.
    :param casting: ``"scale_after_cast"``: inverse RMS in fp32, the normalised x cast back to
        ``x.dtype`` and then multiplied by the scale in ``promote(weight, x)`` (the result dtype;
        e.g. HF's LlamaRMSNorm); ``"scale_in_fp32"``: everything in fp32, the weight multiply
        included, cast to ``x.dtype`` at the end (e.g. HF's GemmaRMSNorm, with ``offset=1``);
        ``"none"``: everything in ``x.dtype``.
    :returns: ``[..., H]``.
    """
    if casting not in CASTING_MODES:
        raise ValueError(f"casting must be one of {CASTING_MODES}, got {casting!r}")
    if casting == "none":
        scale = weight.to(x.dtype) + offset if offset else weight.to(x.dtype)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "scale_in_fp32":
        return (normed * (offset + weight.float())).to(x.dtype)
    if offset == 0.0:
        return weight * normed.to(x.dtype)
    out_dtype = rms_norm_out_dtype(x, weight, casting)
    return ((weight.float() + offset) * normed.to(x.dtype).float()).to(out_dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension (``F.layer_norm``: statistics in fp32, result in ``x.dtype``).

    :param x: ``[..., H]``; ``weight``: ``[H]``; ``bias``: ``[H]`` or None.
    """
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
