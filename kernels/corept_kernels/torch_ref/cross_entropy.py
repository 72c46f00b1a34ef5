"""Pure-torch twins of :func:`corept_kernels.cross_entropy` and
:func:`corept_kernels.fused_linear_cross_entropy`, plus the option checks and reduction rules both
the Triton paths and the twins share (one definition of the semantics).

Per-token loss, with ``z`` the logits of one token upcast to fp32, multiplied by ``logit_scale``
and optionally soft-capped (``softcap * tanh(z / softcap)``), ``lse = logsumexp(z)``, label ``y``,
smoothing ``eps`` and z-loss coefficient ``c``::

    loss = (1 - eps) * (lse - z[y]) + eps * mean_v(lse - z[v]) + c * lse**2

Ignored tokens (``label == ignore_index``) contribute 0 and are not counted. Reductions:
``"none"`` -> per-token losses shaped like ``labels``; ``"sum"``; ``"mean"`` -> sum / number of
non-ignored tokens, and **0.0 (not NaN) when every token is ignored** (torch returns NaN there);
with ``num_items_in_batch`` the mean becomes sum / num_items_in_batch (HF's gradient-accumulation
rule; only allowed with ``reduction="mean"``). Losses are returned in fp32 whatever the logits
dtype (as HF's ``logits.float()`` path does).
"""
from __future__ import annotations

import math

import torch

_REDUCTIONS = ("mean", "sum", "none")


def check_options(*, reduction: str, logit_scale: float, softcap, label_smoothing: float, z_loss: float,
                  num_items_in_batch) -> None:
    """Raise ``ValueError`` for an unsupported option combination (nothing is silently dropped)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not math.isfinite(float(logit_scale)):
        raise ValueError(f"logit_scale must be finite, got {logit_scale!r}")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if float(z_loss) < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError("num_items_in_batch replaces the mean's divisor; it needs reduction='mean' "
                         f"(got {reduction!r})")


def loss_divisor(labels: torch.Tensor, ignore_index: int, reduction: str, num_items_in_batch,
                 device: torch.device) -> torch.Tensor | None:
    """The fp32 0-d tensor (on ``device``) the summed loss is divided by; None unless "mean".

    ``num_items_in_batch`` (int or 0-d tensor on any device) wins; otherwise the number of
    non-ignored labels, clamped to >= 1 so that an all-ignored batch gives loss 0. No host sync.
    """
    if reduction != "mean":
        return None
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch).to(device=device, dtype=torch.float32).reshape(())
    return (labels != ignore_index).sum().clamp_min(1).to(torch.float32)


def reduce_rows(loss_rows: torch.Tensor, divisor: torch.Tensor | None, reduction: str,
                shape: torch.Size) -> torch.Tensor:
    """Per-token losses [N] fp32 -> the requested reduction (``shape``: labels' shape for "none")."""
    if reduction == "none":
        return loss_rows.reshape(shape)
    total = loss_rows.sum()
    return total if divisor is None else total / divisor


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the lm_head matmul: autocast's dtype when autocast is on for the device (as
    ``nn.Linear`` would run), else the promotion of ``hidden`` and ``weight`` dtypes."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def ce_rows(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int, logit_scale: float,
            softcap, label_smoothing: float, z_loss: float):
    """Per-token quantities in fp32 (differentiable).

    :param logits: [N, V] any float dtype (scaled by ``logit_scale`` after the upcast to fp32).
    :param labels: [N] integer.
    :returns: ``(loss [N], lse [N], logprob_of_label [N])``; all 0 for ignored tokens.
    """
    z = logits.float()
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != ignore_index
    z_y = z.gather(1, torch.where(valid, labels, 0).long().unsqueeze(1)).squeeze(1)
    eps = float(label_smoothing)
    loss = lse - (1.0 - eps) * z_y
    if eps:
        loss = loss - eps * z.mean(dim=-1)
    if z_loss:
        loss = loss + z_loss * lse * lse
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    return (torch.where(valid, loss, zero), torch.where(valid, lse, zero),
            torch.where(valid, z_y - lse, zero))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  softcap: float | None = None, logit_scale: float = 1.0, label_smoothing: float = 0.0,
                  reduction: str = "mean", num_items_in_batch=None, z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``logits`` [..., V] against ``labels`` [...] (see module doc for semantics).

    :returns: fp32 scalar ("mean", "sum") or fp32 per-token losses shaped like ``labels`` ("none").
    """
    check_options(reduction=reduction, logit_scale=logit_scale, softcap=softcap,
                  label_smoothing=label_smoothing, z_loss=z_loss, num_items_in_batch=num_items_in_batch)
    V = logits.shape[-1]
    y = labels.reshape(-1)
    rows, _, _ = ce_rows(logits.reshape(-1, V), y, ignore_index=ignore_index, logit_scale=logit_scale,
                         softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss)
    div = loss_divisor(y, ignore_index, reduction, num_items_in_batch, logits.device)
    return reduce_rows(rows, div, reduction, labels.shape)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               softcap: float | None = None, logit_scale: float = 1.0, label_smoothing: float = 0.0,
                               reduction: str = "mean", num_items_in_batch=None, z_loss: float = 0.0,
                               return_logprobs: bool = False, chunk_size: int | None = None):
    """Cross-entropy of ``logit_scale * (hidden @ weight.T + bias)`` (unfused twin: materializes
    the logits; the scale multiplies their fp32 upcast).

    :param hidden: [..., H]. :param weight: [V, H]. :param labels: [...]. :param bias: [V] or None.
        The matmul runs in :func:`matmul_dtype` (autocast's dtype under autocast).
    :param chunk_size: accepted for signature parity with the Triton path; unused here.
    :returns: the loss as :func:`cross_entropy` does, and with ``return_logprobs=True`` also the
        fp32 log-probabilities of the label tokens shaped like ``labels`` (0 where ignored).
    """
    check_options(reduction=reduction, logit_scale=logit_scale, softcap=softcap,
                  label_smoothing=label_smoothing, z_loss=z_loss, num_items_in_batch=num_items_in_batch)
    del chunk_size
    dt = matmul_dtype(hidden, weight)
    h = hidden.reshape(-1, hidden.shape[-1]).to(dt)
    logits = h @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    y = labels.reshape(-1)
    rows, _, lp = ce_rows(logits, y, ignore_index=ignore_index, logit_scale=logit_scale,
                          softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss)
    div = loss_divisor(y, ignore_index, reduction, num_items_in_batch, hidden.device)
    loss = reduce_rows(rows, div, reduction, labels.shape)
    return (loss, lp.reshape(labels.shape)) if return_logprobs else loss
