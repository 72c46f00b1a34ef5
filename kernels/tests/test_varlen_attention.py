"""varlen_attention (Triton, through the interpreter) vs its torch twin and vs an independent gold.

Gold: each document on its own, in float64: SDPA ``is_causal=True`` with repeated kv heads, or
(window, softcap) transformers' Gemma-2 ``eager_attention_forward`` under transformers' own
``sliding_window_causal_mask_function``. bf16 is judged against transformers' eager attention run
in bf16 (and the twin, fp32 inside) by :func:`tolerances.assert_low_precision_ok`.
"""
from __future__ import annotations

import itertools
import types

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from corept_kernels import capabilities
from corept_kernels.attention import varlen, varlen_attention, varlen_launch
from corept_kernels.attention.varlen_launch import Blocks
from corept_kernels.torch_ref import attention as ref
from tolerances import assert_close_fp32, assert_low_precision_ok

LENS = [1, 5, 17, 63, 130, 1, 29]  # T = 246: not a multiple of any tile


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(varlen_launch, "POISON_OUTPUTS", True)


def _cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _inputs(lens, Hq, Hkv, D, dtype):
    T = sum(lens)
    return tuple(torch.randn(T, h, D, dtype=torch.float64).to(dtype) for h in (Hq, Hkv, Hkv))


def _hf_eager(q, k, v, scale, window, softcap):
    """transformers' Gemma-2 eager attention of one document ``[n, H, D]`` under transformers'
    (sliding-window) causal mask function; ``[n, Hq, D]``."""
    n = q.shape[0]
    mask_fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    i = torch.arange(n)
    allowed = mask_fn(0, 0, i[:, None], i[None, :])
    additive = torch.zeros(n, n, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)
    module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False)
    heads = [t.transpose(0, 1)[None] for t in (q, k, v)]
    return eager_attention_forward(module, *heads, additive[None, None], scaling=scale, softcap=softcap)[0][0]


def _sdpa(q, k, v, scale, window, softcap):
    assert window is None and softcap is None
    group = q.shape[1] // k.shape[1]
    heads = [t.transpose(0, 1) for t in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))]
    return F.scaled_dot_product_attention(*heads, is_causal=True, scale=scale).transpose(0, 1)


def _per_document(attn, lens):
    """``attn`` run on each document separately, the results concatenated: a varlen function."""
    def run(q, k, v, cu_seqlens, max_seqlen, *, scale, window=None, softcap=None):
        bounds = cu_seqlens.tolist()
        return torch.cat([attn(q[s:e], k[s:e], v[s:e], scale, window, softcap)
                          for s, e in zip(bounds[:-1], bounds[1:]) if e > s])
    return run


def _run(fn, q, k, v, cu, dout, **opts):
    """(out, dq, dk, dv) of ``fn`` on leaf copies of q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, cu, int((cu[1:] - cu[:-1]).max()), **opts)
    out.backward(dout)
    return (out.detach(), *(t.grad for t in leaves))


def _check(lens, Hq, Hkv, D, dtype, window, softcap):
    q, k, v = _inputs(lens, Hq, Hkv, D, dtype)
    cu = _cu(lens)
    dout = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    opts = dict(scale=D ** -0.5, window=window, softcap=softcap)
    got = _run(varlen_attention, q, k, v, cu, dout, **opts)
    assert all(g.dtype == dtype for g in got)
    twin = _run(ref.varlen_attention, q, k, v, cu, dout, **opts)
    gold_attn = _sdpa if window is None and softcap is None else _hf_eager
    gold = _run(_per_document(gold_attn, lens), q.double(), k.double(), v.double(), cu, dout.double(), **opts)
    names = ("out", "dq", "dk", "dv")
    if dtype == torch.float32:
        for g, t, w in zip(got, twin, gold):
            assert_close_fp32(g, w)
            assert_close_fp32(t, w)
            assert_close_fp32(g, t)
        return
    low = _run(_per_document(_hf_eager, lens), q, k, v, cu, dout, **opts)
    for name, g, t, w, lo in zip(names, got, twin, gold, low):
        assert_low_precision_ok(g, w, lo, f"{name} vs transformers in {dtype}")
        assert_low_precision_ok(g, w, t, f"{name} vs the twin")


CASES = [  # D, Hq, Hkv, window, softcap, dtype
    (64, 4, 4, None, None, torch.float32),
    (72, 4, 2, 20, None, torch.float32),
    (128, 6, 1, None, 30.0, torch.float32),
    (256, 4, 2, 50, 20.0, torch.float32),
    (64, 6, 1, 3, 5.0, torch.float32),
    (64, 4, 2, None, None, torch.bfloat16),
    (72, 6, 1, 40, 10.0, torch.bfloat16),
    (128, 4, 4, 100, None, torch.bfloat16),
    (256, 6, 1, None, 50.0, torch.bfloat16),
]


@pytest.mark.parametrize("D,Hq,Hkv,window,softcap,dtype", CASES,
                         ids=[f"D{c[0]}-{c[1]}q{c[2]}kv-w{c[3]}-cap{c[4]}-{str(c[5])[6:]}" for c in CASES])
def test_varlen_attention_matches_twin_and_per_document_gold(D, Hq, Hkv, window, softcap, dtype):
    _check(LENS, Hq, Hkv, D, dtype, window, softcap)


@pytest.mark.parametrize("window", [None, 7, 20, 40])
def test_several_tiles_per_document(monkeypatch, window):
    """Small tiles: long documents span many tiles, so every stretch of each kernel's loop (window
    edge, unmasked middle, causal diagonal) runs, with loop blocks smaller than the tile; an empty
    document too."""
    monkeypatch.setattr(varlen_launch, "BLOCKS_OFF_CUDA", Blocks(tile=32, fwd_n=16, dq_n=16, kv_m=16, fwd_warps=4,
                                                                 bwd_warps=4, fwd_stages=1, bwd_stages=1))
    _check([40, 1, 0, 130, 16, 33], 4, 2, 24, torch.float32, window, 3.0 if window == 7 else None)


def test_other_documents_are_bitwise_unchanged_when_one_changes():
    lens = [5, 63, 130, 17]
    cu = _cu(lens)
    q, k, v = _inputs(lens, 4, 2, 64, torch.float32)
    dout = torch.randn(q.shape)
    base = _run(varlen_attention, q, k, v, cu, dout, scale=0.125, window=50)
    s, e = cu[2].item(), cu[3].item()
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[s:e] += torch.randn_like(t[s:e])
    new = _run(varlen_attention, q2, k2, v2, cu, dout, scale=0.125, window=50)
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, new):
        assert torch.equal(a[:s], b[:s]) and torch.equal(a[e:], b[e:]), name
        assert not torch.equal(a[s:e], b[s:e]), name


def test_strided_inputs_read_in_place_or_copied():
    """q, k, v sliced out of a fused qkv buffer (token stride > H * D) and a D-strided q (copied)
    give the contiguous inputs' results bit for bit."""
    lens, Hq, Hkv, D = [9, 70], 4, 2, 40
    T = sum(lens)
    cu = _cu(lens)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D)
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    dout = torch.randn(T, Hq, D)
    want = _run(varlen_attention, q.contiguous(), k.contiguous(), v.contiguous(), cu, dout, scale=0.2)
    got = varlen_attention(q, k, v, cu, 70, scale=0.2)
    assert torch.equal(got, want[0])
    q_dstrided = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert q_dstrided.stride(-1) != 1
    got = varlen_attention(q_dstrided, k, v, cu, 70, scale=0.2)
    assert torch.equal(got, want[0])


def test_schedule_covers_every_tile_once_heaviest_first():
    lens = [1, 0, 100, 33, 64, 7]
    tile = 32
    sched = varlen_launch.schedule(_cu(lens), sum(lens), tile)
    cu = _cu(lens).tolist()
    tiles = [(cu[d] + j * tile, cu[d], cu[d + 1]) for d in range(len(lens)) for j in range(-(-lens[d] // tile))]
    bound = -(-sum(lens) // tile) + len(lens)
    assert sched.shape[0] == 2 and sched.shape[2] == 3 and bound <= sched.shape[1] < bound + 4
    for order in (0, 1):
        rows = [tuple(r) for r in sched[order].tolist()]
        assert sorted(rows[:len(tiles)]) == sorted(tiles)
        assert rows[len(tiles):] == [(0, 0, 0)] * (len(rows) - len(tiles))
        work = [(s - d0) // tile if order == 0 else -(-(d1 - s) // tile) for s, d0, d1 in rows[:len(tiles)]]
        assert work == sorted(work, reverse=True), order


@pytest.mark.parametrize("n_docs", [1, 2, 3, 4, 5, 17])
def test_batches_do_not_select_new_compiled_variants(n_docs):
    """Triton compiles a kernel per divisibility-by-16 of its integer arguments and per 16-byte
    alignment of its pointers. Packed batches vary ``T``, the document count and the window
    (``T + 1`` without one) from step to step: the kernels must not specialize on them, and the
    schedule's second order (``dK/dV`` reads it) must start aligned whatever the count."""
    from corept_kernels.attention import varlen_kernels as kn

    unspecialized = {"fwd_kernel": {"T", "window"}, "dq_kernel": {"T", "window"}, "dkdv_kernel": {"T", "window"},
                     "delta_kernel": {"T"}, "schedule_kernel": {"N", "size"}}
    for name, args in unspecialized.items():
        fn = getattr(kn, name)
        # a JITFunction holds the list (indices); the interpreter's wrapper the decorator's kwargs
        declared = getattr(fn, "do_not_specialize", None) or getattr(fn, "kwargs", {}).get("do_not_specialize", ())
        skipped = {fn.arg_names[i] if isinstance(i, int) else i for i in declared}
        assert args <= skipped, (name, args - skipped)
    lens = [37 + 5 * i for i in range(n_docs)]
    sched = varlen_launch.schedule(_cu(lens), sum(lens), 32)
    assert sched[1].data_ptr() % 16 == 0


def test_twin_matches_gold_and_fallbacks(monkeypatch):
    info = capabilities.get("varlen_attention")
    assert info.has_backward and info.compile_safe and info.devices == ("cuda",)
    lens = [3, 8, 1]
    cu = _cu(lens)
    q, k, v = _inputs(lens, 4, 2, 16, torch.float32)
    for window, softcap in ((None, None), (2, None), (None, 1.5), (3, 4.0)):
        opts = dict(scale=0.3, window=window, softcap=softcap)
        want = _per_document(_hf_eager, lens)(q.double(), k.double(), v.double(), cu, 8, **opts)
        assert_close_fp32(ref.varlen_attention(q, k, v, cu, 8, **opts), want)
    fn, reason = capabilities.dispatch("varlen_attention", *_inputs(lens, 2, 1, 320, torch.float32), cu)
    assert fn is info.reference_fn and "head dim 320 > 256" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(varlen._VarlenAttentionFn, "apply", lambda *a: pytest.fail("Triton path without interpreter"))
    assert torch.equal(varlen_attention(q, k, v, cu, 8, scale=0.3), ref.varlen_attention(q, k, v, cu, 8, scale=0.3))


def test_twin_cuts_a_long_cpu_pack_into_chunks_of_whole_documents(monkeypatch):
    """On a CPU a pack longer than ``CHUNK_TOKENS`` runs as chunks of whole documents (a document
    longer than a chunk alone; empty documents anywhere): output and every gradient, sinks included,
    equal the one dense block's in fp32, and the chunks are the greedy packing of the documents."""
    monkeypatch.setattr(ref, "CHUNK_TOKENS", 8)
    assert ref._chunks([0, 3, 3, 8, 20, 21, 25, 25]) == [(0, 8), (8, 20), (20, 25)]
    assert ref._chunks([0, 0, 30]) == [(0, 30)] and ref._chunks([0, 4, 8, 12]) == [(0, 8), (8, 12)]
    lens = [3, 0, 5, 12, 1, 4, 0]
    cu = _cu(lens)
    q, k, v = _inputs(lens, 4, 2, 16, torch.float32)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(5))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    calls = []
    dense = ref._dense
    monkeypatch.setattr(ref, "_dense", lambda q, *a, **kw: calls.append(q.shape[0]) or dense(q, *a, **kw))
    for window, softcap in ((None, None), (3, 2.0)):
        opts = dict(scale=0.3, window=window, softcap=softcap)
        calls.clear()
        got = _run_sinks(ref.varlen_attention, q, k, v, cu, sinks, dout, **opts)
        assert calls == [8, 12, 5]
        want = _run_sinks(lambda q, k, v, cu, m, **kw: dense(q, k, v, cu, **kw), q, k, v, cu, sinks, dout, **opts)
        for g, w in zip(got, want):
            assert_close_fp32(g, w)


@pytest.mark.parametrize("bad", ["q-2d", "heads", "dtype", "cu-float", "cu-short", "window-0", "softcap-neg"])
def test_bad_arguments_raise(bad):
    q, k, v = _inputs([4, 4], 4, 2, 16, torch.float32)
    cu, opts = _cu([4, 4]), dict(scale=0.25)
    if bad == "q-2d":
        q = q[:, 0]
    elif bad == "heads":
        k, v = _inputs([4, 4], 3, 3, 16, torch.float32)[1:]
    elif bad == "dtype":
        v = v.bfloat16()
    elif bad == "cu-float":
        cu = cu.float()
    elif bad == "cu-short":
        cu = cu[:1]
    elif bad == "window-0":
        opts["window"] = 0
    else:
        opts["softcap"] = -1.0
    with pytest.raises(ValueError):
        varlen_attention(q, k, v, cu, 4, **opts)


def _gpt_oss_eager(sinks):
    """transformers' gpt-oss eager attention (sink logits) of one document ``[n, H, D]``, causal or
    sliding; ``[n, Hq, D]``."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

    def attn(q, k, v, scale, window, softcap):
        assert softcap is None
        n = q.shape[0]
        mask_fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
        i = torch.arange(n)
        additive = torch.zeros(n, n, dtype=q.dtype).masked_fill(~mask_fn(0, 0, i[:, None], i[None, :]),
                                                                torch.finfo(q.dtype).min)
        module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False,
                                       sinks=sinks.to(q.dtype))
        heads = [t.transpose(0, 1)[None] for t in (q, k, v)]
        return gpt_oss_eager(module, *heads, additive[None, None], scaling=scale)[0][0]
    return attn


def _run_sinks(fn, q, k, v, cu, sinks, dout, **opts):
    """(out, dq, dk, dv, dsinks) of ``fn`` on leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
    out = fn(*leaves[:3], cu, int((cu[1:] - cu[:-1]).max()), sinks=leaves[3], **opts)
    out.backward(dout)
    return (out.detach(), *(t.grad for t in leaves))


SINK_CASES = [  # D, Hq, Hkv, window, dtype
    (64, 4, 2, None, torch.float32),
    (72, 6, 1, 3, torch.float32),
    (128, 6, 2, 40, torch.bfloat16),
]


@pytest.mark.parametrize("D,Hq,Hkv,window,dtype", SINK_CASES)
def test_sinks_match_the_twin_and_gpt_oss_eager(D, Hq, Hkv, window, dtype):
    """Attention sinks (gpt-oss): output and the gradients of q, k, v and the sinks, against the twin
    and transformers' gpt-oss eager attention run per document (float64 gold)."""
    q, k, v = _inputs(LENS, Hq, Hkv, D, dtype)
    cu = _cu(LENS)
    sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(3)) * 2
    dout = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    opts = dict(scale=D ** -0.5, window=window)
    got = _run_sinks(varlen_attention, q, k, v, cu, sinks, dout, **opts)
    twin = _run_sinks(ref.varlen_attention, q, k, v, cu, sinks, dout, **opts)

    def per_doc(q, k, v, cu, max_seqlen, *, sinks, scale, window):
        bounds = cu.tolist()
        return torch.cat([_gpt_oss_eager(sinks)(q[s:e], k[s:e], v[s:e], scale, window, None)
                          for s, e in zip(bounds[:-1], bounds[1:]) if e > s])

    gold = _run_sinks(per_doc, q.double(), k.double(), v.double(), cu, sinks.double(), dout.double(), **opts)
    names = ("out", "dq", "dk", "dv", "dsinks")
    if dtype == torch.float32:
        for g, t, w in zip(got, twin, gold):
            assert_close_fp32(g, w)
            assert_close_fp32(t, w)
        return
    low = _run_sinks(per_doc, q, k, v, cu, sinks, dout, **opts)
    for name, g, w, lo in zip(names, got, gold, low):
        assert_low_precision_ok(g, w, lo, f"{name} vs transformers' gpt-oss attention in {dtype}")


def test_sinks_are_checked():
    q, k, v = _inputs([4], 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=r"sinks must be \[4\]"):
        varlen_attention(q, k, v, _cu([4]), 4, scale=0.25, sinks=torch.zeros(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled sink forward on the device")
@pytest.mark.parametrize("D,Hq,Hkv,window,dtype", [(64, 8, 2, None, torch.bfloat16), (64, 8, 1, 40, torch.bfloat16)])
def test_sinks_on_cuda_within_the_rule_of_gpt_oss_eager(D, Hq, Hkv, window, dtype):
    """The sink kernel compiled for the GPU (the interpreter runs the same code on CPU above): output
    and the q/k/v/sink gradients within the low-precision rule against transformers' gpt-oss eager
    attention, float64 gold."""
    lens = [1, 130, 257, 64]
    q, k, v = (t.cuda() for t in _inputs(lens, Hq, Hkv, D, dtype))
    cu = _cu(lens).cuda()
    sinks = (torch.randn(Hq, generator=torch.Generator().manual_seed(3)) * 2).cuda()
    dout = torch.randn(q.shape, dtype=torch.float64).to(dtype).cuda()
    opts = dict(scale=D ** -0.5, window=window)
    got = _run_sinks(varlen_attention, q, k, v, cu, sinks, dout, **opts)

    def per_doc(q, k, v, cu, max_seqlen, *, sinks, scale, window):
        bounds = cu.tolist()
        return torch.cat([_gpt_oss_eager(sinks)(q[s:e], k[s:e], v[s:e], scale, window, None)
                          for s, e in zip(bounds[:-1], bounds[1:]) if e > s])

    cpu = [t.cpu() for t in (q, k, v, cu, sinks, dout)]
    gold = _run_sinks(per_doc, *(t.double() if t.is_floating_point() else t for t in cpu), **opts)
    low = _run_sinks(per_doc, *cpu, **opts)
    for name, g, w, lo in zip(("out", "dq", "dk", "dv", "dsinks"), got, gold, low):
        assert_low_precision_ok(g.cpu(), w, lo, f"{name} (CUDA) vs transformers' gpt-oss attention")
