"""Pure-torch twin of :mod:`corept_kernels.attention` (same signature and semantics, autograd backward).

A dense ``[T, T]`` mask (same document, causal, window) over fp32 scores of all heads: simple and
free of host syncs (it traces in ``torch.compile``), but ``O(Hq * T**2)`` memory: a fallback for
small inputs and the kernel tests' reference. On a CPU (where it is what runs without the Triton
interpreter) a long pack is cut into chunks of whole documents first.
"""
from __future__ import annotations

import torch


# On a CPU the documents' bounds cost no device wait, so the dense mask is built per chunk of whole
# documents (at most CHUNK_TOKENS, or one longer document): a pack of many short documents then
# costs O(T * CHUNK_TOKENS) instead of O(T**2). On other devices (and while compiling) one dense
# block keeps the twin free of host syncs.
CHUNK_TOKENS = 512


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, scale: float, window: int | None = None,
                     softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention within the documents ``cu_seqlens`` marks in a packed stream.

    :param q: ``[T, Hq, D]``; ``k``, ``v``: ``[T, Hkv, D]``, ``Hq % Hkv == 0``.
    :param cu_seqlens: ``[N + 1]`` document boundaries (``cu[0] = 0``, ``cu[N] = T``).
    :param max_seqlen: unused (flash-attn's argument; kept for the common signature).
    :param window: query ``i`` sees keys ``j`` with ``i - window < j <= i`` (transformers' sliding window).
    :param softcap: scores ``softcap * tanh(scale * qk / softcap)`` before masking (Gemma-2).
    :param sinks: ``[Hq]`` one learned logit per query head that joins every row's softmax and
        attends to nothing (gpt-oss): the row's weights sum to less than one.
    :returns: ``[T, Hq, D]`` in ``q``'s dtype, computed in fp32.
    """
    opts = dict(scale=scale, window=window, softcap=softcap, sinks=sinks)
    if q.device.type != "cpu" or torch.compiler.is_compiling() or q.shape[0] <= CHUNK_TOKENS:
        return _dense(q, k, v, cu_seqlens, **opts)
    parts = []
    for a, b in _chunks(cu_seqlens.tolist()):
        cu = cu_seqlens[(cu_seqlens >= a) & (cu_seqlens <= b)] - a
        parts.append(_dense(q[a:b], k[a:b], v[a:b], cu, **opts))
    return torch.cat(parts) if parts else q.new_empty(q.shape)


def _chunks(bounds: list[int]) -> list[tuple[int, int]]:
    """``[a, b)`` token ranges of whole documents, each at most ``CHUNK_TOKENS`` long unless it is
    one longer document; empty documents dropped."""
    out: list[tuple[int, int]] = []
    a = bounds[0]
    for e, f in zip(bounds[1:], bounds[2:] + [None]):
        if f is None or f - a > CHUNK_TOKENS:  # close the chunk before the next document would overflow it
            if e > a:
                out.append((a, e))
            a = e
    return out


def _dense(q, k, v, cu_seqlens, *, scale, window, softcap, sinks):
    """One dense ``[Hq, T, T]`` block over every token of ``q`` (``cu_seqlens`` from 0 to ``T``)."""
    T, Hq, _ = q.shape
    group = Hq // k.shape[1]
    pos = torch.arange(T, device=q.device)
    doc = torch.searchsorted(cu_seqlens[1:].contiguous(), pos.to(cu_seqlens.dtype), right=True)
    mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    qf = q.float().transpose(0, 1)  # [Hq, T, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = qf @ kf.transpose(1, 2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float()[:, None, None].expand(Hq, T, 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :T]
    else:
        probs = scores.softmax(-1)
    return (probs @ vf).transpose(0, 1).to(q.dtype)
