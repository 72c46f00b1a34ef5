"""Attention for packed batches: document-masked, through corept's varlen Triton kernel.

A padding-free batch (TRL's ``padding_free`` / ``packing=True`` collator, or any caller) is one row
of ``T`` tokens holding several documents. transformers marks it two ways: the collator's
``cu_seq_lens_q/k`` (int32 ``[N+1]`` document starts, then ``T``) and ``max_length_q/k`` reach the
attention function as keyword arguments, and ``position_ids`` restart at 0 at every document.
SDPA and eager then attend through a dense ``[T, T]`` block mask built from the position ids;
:func:`corept_kernels.varlen_attention` instead skips every block outside a document, so a packed
step costs the sum of its documents' attention, not ``T**2``.

Transformers' attention forwards look up their function as
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``, a
module global. As with RoPE, that global is rebound for this attention instance's forward only: the
stand-in answers a function that runs the kernel on the collator's packed batches and, under the
eager implementation, on every causal call whose mask is none or exactly the plain causal (or
sliding-window) mask transformers builds for unpadded rows (the documents then come from the
position ids, on the device), and hands every other call (padding, the document mask transformers
built from the position ids, generation with a cache, dropout, attention weights requested,
arguments the kernel does not model) to the function transformers would have used, unchanged.

Attention sinks (gpt-oss passes its per-head sink logits as ``s_aux``) run on the kernel too.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from corept_kernels import varlen_attention

from corept.patching.answers import Keep, Replacement
from corept.patching.sharing import shared
from corept.patching.signature import innermost

INTERFACE_GLOBAL = "ALL_ATTENTION_FUNCTIONS"
#: implementations whose unmasked causal calls the kernel takes too (SDPA and flash have their own)
UNMASKED = ("eager",)
#: keyword arguments of the attention interface that change its math and the kernel does not model
_UNMODELLED = ("sinks", "position_bias", "head_mask")
#: the keyword argument that carries attention sinks ``[Hq]`` (gpt-oss), the kernel's ``sinks=``
SINKS = "s_aux"
_VERDICTS = "_corept_plain_causal"  # per-mask memo: {(window, version): bool}


def plain_causal(mask: torch.Tensor, b: int, s: int, window: int | None) -> bool:
    """Whether ``mask`` is exactly the mask transformers' eager path builds for ``b`` unpadded rows of
    ``s`` tokens: causal, and inside ``window`` when one is given (key ``j`` open to query ``i`` iff
    ``i - window < j <= i``). ``mask``: ``[b or 1, 1, s, s]``, additive (0 open, at most half the
    dtype's minimum closed) or boolean (True open).

    Checked on the device with one wait for the host per mask object: transformers builds each
    mask once per forward and hands the same tensor to every layer of its kind, so the verdict is
    kept on the tensor (keyed by the window and the tensor's version). Never while compiling (the
    wait would break the graph): those calls keep transformers' path.
    """
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, b) or tuple(mask.shape[2:]) != (s, s):
        return False
    if torch.compiler.is_compiling():
        return False
    try:
        key = (window, mask._version)
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        key = (window, None)
    verdicts = mask.__dict__.setdefault(_VERDICTS, {})
    if key not in verdicts:
        pos = torch.arange(s, device=mask.device)
        allowed = pos[None, :] <= pos[:, None]
        if window is not None:
            allowed &= pos[None, :] > pos[:, None] - window
        if mask.dtype == torch.bool:
            verdicts[key] = bool(torch.equal(mask, allowed.expand_as(mask)))
        else:
            open_ = mask == 0
            closed = mask <= torch.finfo(mask.dtype).min / 2
            verdicts[key] = bool(((open_ == allowed) & (open_ | closed)).all())
    return verdicts[key]


def packed_boundaries(query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs: dict):
    """``(cu_seqlens int32 [N+1], max_seqlen)`` when the kernel takes this call, else ``None``.

    ``query`` ``[B, Hq, S, D]``, ``key`` ``[B, Hkv, S, D]``. The collator's ``cu_seq_lens_q`` wins
    (one row; the attention mask then only restates the documents). Otherwise a call without an
    attention mask (transformers passes none for an unpadded causal batch) is split where its
    ``position_ids`` ``[B, S]`` restart, and at every row: computed on the device, with no wait for
    the host, as ``B * S + 1`` boundaries of which the surplus ones are empty documents at the end.
    A mask that is exactly the plain causal (sliding) one for these rows counts as none
    (:func:`plain_causal`).
    """
    b, s = query.shape[0], query.shape[2]
    if s != key.shape[2]:
        return None  # a cache: generation
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:  # self-attention without a cache: the keys' boundaries are the queries'
        if b != 1:
            return None
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = s
        return cu.to(device=query.device, dtype=torch.int32), int(max_len)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return None
    if attention_mask is not None and not (
            torch.is_tensor(attention_mask) and plain_causal(attention_mask, b, s, kwargs.get("sliding_window"))):
        return None
    pos = position_ids.to(query.device).expand(b, s)
    starts = torch.ones((b, s), dtype=torch.bool, device=query.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    index = torch.arange(b * s, device=query.device, dtype=torch.int32)
    ends = torch.full((1,), b * s, device=query.device, dtype=torch.int32)
    cu = torch.cat([torch.where(starts.reshape(-1), index, b * s).sort().values, ends])
    return cu, s


def packed_attention(fallback, *, unmasked: bool = True):
    """An attention-interface function: the varlen kernel on packed calls, ``fallback`` otherwise.

    :param unmasked: also take causal calls without a mask, or with the plain causal one (documents
        from the position ids). Off for SDPA and flash implementations: their own causal kernels are
        faster on plain rows (H100: SDPA 1.22 ms vs the varlen kernel 1.49 ms forward + backward for
        2 x 2048 tokens, docs/packing.md).
    Returns ``(attn_output [B, S, Hq, D], None)`` as transformers' functions do.
    """

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        bounds = None
        if not dropout and not kwargs.get("output_attentions") and getattr(module, "is_causal", True) \
                and all(kwargs.get(k) is None for k in _UNMODELLED):
            if unmasked or kwargs.get("cu_seq_lens_q") is not None:
                bounds = packed_boundaries(query, key, attention_mask, kwargs)
        if bounds is None:
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        cu_seqlens, max_len = bounds
        b, hq, s, d = query.shape
        q = query.transpose(1, 2).reshape(b * s, hq, d)
        k = key.transpose(1, 2).reshape(b * s, key.shape[1], d)
        v = value.transpose(1, 2).reshape(b * s, value.shape[1], value.shape[-1])
        out = varlen_attention(q, k, v, cu_seqlens, max_len, scale=d ** -0.5 if scaling is None else scaling,
                               window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"),
                               sinks=kwargs.get(SINKS))
        return out.view(b, s, hq, out.shape[-1]), None

    attention.__corept_fallback__ = fallback
    return attention


class PackedInterfaces:
    """Stands in for ``ALL_ATTENTION_FUNCTIONS`` in one attention forward's globals: every lookup
    answers :func:`packed_attention` around what the real registry answers."""

    def __init__(self, interfaces):
        self.interfaces = interfaces
        # made up front for every registered function: a compiled layer guards on this dict, and
        # one filled at the first call would recompile every compiled layer once (eager models'
        # own function, which is not registered, still adds one entry at its first call)
        self._made: dict = {}
        for name in list(interfaces.keys()) if hasattr(interfaces, "keys") else ():
            self.get_interface(name, None)

    def get_interface(self, attn_implementation, default):
        fallback = self.interfaces.get_interface(attn_implementation, default)
        if fallback is None:
            return None
        made = self._made.get(fallback)
        if made is None:
            made = self._made[fallback] = packed_attention(fallback, unmasked=attn_implementation in UNMASKED)
        return made

    def __getattr__(self, name):  # anything else the forward reads goes to the real registry
        return getattr(self.interfaces, name)

    def __getitem__(self, key):
        return self.interfaces[key]

    def __contains__(self, key):
        return key in self.interfaces


def attention_replacement(arch, module: nn.Module, model: nn.Module) -> Replacement | Keep:
    """Packed batches of this attention instance through the varlen kernel (see the module doc)."""
    cls = type(module).__name__
    fn = innermost(type(module).forward)
    if INTERFACE_GLOBAL not in getattr(getattr(fn, "__code__", None), "co_names", ()):
        return Keep(f"{cls}.forward does not look up transformers' {INTERFACE_GLOBAL} (nothing to route)")
    interfaces = fn.__globals__.get(INTERFACE_GLOBAL)
    if interfaces is None or not hasattr(interfaces, "get_interface"):
        return Keep(f"{cls}.forward's module has no {INTERFACE_GLOBAL} registry")
    device = next((p.device for p in module.parameters()), None)
    if device is not None and device.type == "meta":
        return Keep(f"{cls}: cannot patch attention on meta tensors (load the weights first)")
    # the report shows triton:varlen_attention, or torch:varlen_attention with the reason on a device
    # the kernel cannot run on; calls that are not packed reach transformers' function unchanged
    # one stand-in per registry (it keeps the registry alive, so its id names it)
    packed = shared(("attention", id(interfaces)), lambda: PackedInterfaces(interfaces))
    return Replacement(kernel="varlen_attention", forward_globals={INTERFACE_GLOBAL: packed})
