"""Varlen attention: causal attention within each document of a packed token stream.

The eager ``autograd.Function`` and the public function; the launches are in
:mod:`corept_kernels.attention.varlen_launch`, the kernels in
:mod:`corept_kernels.attention.varlen_kernels`, the custom-operator form (inside
``torch.compile``) in :mod:`corept_kernels.ops.attention`, the torch twin in
:mod:`corept_kernels.torch_ref.attention`.
"""
from __future__ import annotations

import torch

from corept_kernels import capabilities
from corept_kernels.attention.varlen_launch import LOG2E, MAX_HEAD_DIM, varlen_backward, varlen_forward
from corept_kernels.capabilities import KernelInfo, unsupported_tensors
from corept_kernels.torch_ref import attention as ref


class _VarlenAttentionFn(torch.autograd.Function):
    """The eager form; inside ``torch.compile`` the operators of :mod:`corept_kernels.ops.attention`
    run the same launches."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scale, window, softcap):
        out, lse, sched = varlen_forward(q, k, v, cu_seqlens, scale, window, softcap)
        ctx.save_for_backward(q, k, v, out, lse, sched)
        ctx.options = (scale, window, softcap)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sched = ctx.saved_tensors
        dq, dk, dv = varlen_backward(dout, q, k, v, out, lse, sched, *ctx.options)
        return dq, dk, dv, None, None, None, None


class _VarlenSinkAttentionFn(torch.autograd.Function):
    """With a sink logit ``s_h`` per query head in every row's softmax. The forward kernel folds the
    sink into its softmax (one rounding of the output; ``lse`` includes the sink), so the plain
    backward kernels give dQ/dK/dV from that ``out`` and ``lse``: the sink attends to nothing and
    only moves each row's normaliser. ``ds_h = -sum_t p_sink(h, t) * rowsum(dout * out)(h, t)``
    with ``p_sink = exp(s_h - lse)``."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, sinks, scale, window, softcap):
        out, lse, sched = varlen_forward(q, k, v, cu_seqlens, scale, window, softcap, sinks=sinks)
        ctx.save_for_backward(q, k, v, out, lse, sched, sinks)
        ctx.options = (scale, window, softcap)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sched, sinks = ctx.saved_tensors
        delta = (dout.float() * out.float()).sum(-1).t().contiguous()  # [Hq, T]
        dq, dk, dv = varlen_backward(dout, q, k, v, out, lse, sched, *ctx.options, delta=delta)
        p_sink = torch.exp2(sinks.float()[:, None] * LOG2E - lse)  # lse is base 2
        dsinks = -(p_sink * delta).sum(1).to(sinks.dtype)
        return dq, dk, dv, None, dsinks, None, None, None


def _check(q, k, v, cu_seqlens, max_seqlen, scale, window, softcap):
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"q must be [T, Hq, D] and k, v [T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    T, Hq, D = q.shape
    if k.shape[0] != T or k.shape[2] != D or Hq % k.shape[1]:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (same T and D, Hq a multiple of Hkv)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32/int64 [N + 1] with N >= 1, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")


def _eligibility(q, k, v, cu_seqlens) -> str | None:
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return unsupported_tensors(q, k, v)


def _varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, *, scale, window=None, softcap=None, sinks=None):
    if sinks is not None:
        return _VarlenSinkAttentionFn.apply(q, k, v, cu_seqlens, sinks, scale, window, softcap)
    return _VarlenAttentionFn.apply(q, k, v, cu_seqlens, scale, window, softcap)


def _varlen_attention_compiled(q, k, v, cu_seqlens, max_seqlen, *, scale, window=None, softcap=None, sinks=None):
    if sinks is not None:  # no operator form yet: the twin traces (dense [T, T], for short calls)
        return ref.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=scale, window=window, softcap=softcap,
                                    sinks=sinks)
    return torch.ops.corept_kernels.varlen_attention_fwd(q, k, v, cu_seqlens, scale, window, softcap)[0]


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, scale: float, window: int | None = None,
                     softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention within each document of a packed stream: no token attends across a boundary.

    :param q: ``[T, Hq, D]``; ``k``, ``v``: ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` (query head ``h``
        reads kv head ``h // (Hq // Hkv)``); one dtype (fp32, bf16 or fp16). Any token and head
        strides; a non-unit stride along ``D`` costs a copy. ``D <= 256`` on the Triton path.
    :param cu_seqlens: ``[N + 1]`` int32 (or int64) document boundaries: ``0 = cu[0] <= ... <=
        cu[N] = T`` (empty documents allowed). Not checked against ``T`` (that would wait for the
        device).
    :param max_seqlen: the longest document's length, as flash-attn takes it. The kernels need no
        bound (their schedule is built on the device from ``cu_seqlens``); it is only validated.
    :param scale: the factor on ``q @ k^T`` (usually ``D ** -0.5``).
    :param window: sliding window in transformers' sense: query ``i`` sees keys ``j`` of its
        document with ``i - window < j <= i`` (positions within the document); ``None``: all ``j <= i``.
    :param softcap: Gemma-2's logit softcap: scores ``softcap * tanh(scale * q @ k^T / softcap)``
        before masking and softmax.
    :param sinks: ``[Hq]`` attention sinks (gpt-oss's ``s_aux``): one learned logit per query head
        that joins every row's softmax and attends to nothing. Differentiable.
    :returns: ``[T, Hq, D]`` in ``q``'s dtype; softmax statistics and accumulation in fp32.
        Differentiable in ``q``, ``k``, ``v`` (dK/dV summed over each kv head's query heads).
    """
    _check(q, k, v, cu_seqlens, max_seqlen, scale, window, softcap)
    if sinks is not None and tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks must be [{q.shape[1]}] (one per query head), got {tuple(sinks.shape)}")
    fn, _ = capabilities.dispatch("varlen_attention", q, k, v, cu_seqlens)
    opts = dict(scale=float(scale), window=None if window is None else int(window),
                softcap=None if softcap is None else float(softcap))
    if sinks is not None:
        opts["sinks"] = sinks
    return fn(q, k, v, cu_seqlens, max_seqlen, **opts)


capabilities.register(KernelInfo(
    name="varlen_attention", triton_fn=_varlen_attention_triton, reference_fn=ref.varlen_attention,
    compiled_fn=_varlen_attention_compiled, eligibility=_eligibility,
    notes="packed documents (cu_seqlens), causal, GQA, sliding window, softcap, sinks; D <= 256; deterministic backward"))
