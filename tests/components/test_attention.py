"""The attention component: packed batches through corept's varlen kernel, everything else unchanged.

The conformance kit proves packed == each document alone per plugin; these tests pin the routing:
which calls take the kernel, which reach transformers' own function (with the same arguments),
the boundaries derived from position ids, and undo.
"""
from __future__ import annotations

import copy

import pytest
import torch

import corept
import tiny
from corept.components import attention as A
from corept.testing.suite_packing import documents, packed_batch

LENGTHS = (4, 1, 9, 6)


def _qkv(b=1, s=20, hq=4, hkv=2, d=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, hq, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g),
            torch.randn(b, hkv, s, d, generator=g))


class _Recorder:
    """A fallback attention function that records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.calls.append(kwargs)
        return query.transpose(1, 2), None


class _Module(torch.nn.Module):
    is_causal = True


def test_boundaries_come_from_the_collator_or_from_restarting_position_ids():
    q, k, _ = _qkv(b=2, s=6)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    cu, bound = A.packed_boundaries(q, k, None, {"position_ids": pos})
    assert cu.dtype == torch.int32 and bound == 6
    assert cu.tolist() == [0, 3, 5, 6] + [12] * 9  # rows and restarts; then empty documents
    one_doc_rows = torch.arange(6).expand(2, 6)
    assert A.packed_boundaries(q, k, None, {"position_ids": one_doc_rows})[0].tolist() == [0, 6] + [12] * 11
    assert A.packed_boundaries(q, k, torch.ones(2, 1, 6, 6, dtype=torch.bool), {"position_ids": pos}) is None
    assert A.packed_boundaries(q, k, None, {}) is None
    q1, k1, _ = _qkv(b=1, s=6)
    given = torch.tensor([0, 2, 6], dtype=torch.int32)
    cu, longest = A.packed_boundaries(q1, k1, object(), {"cu_seq_lens_q": given, "cu_seq_lens_k": given,
                                                         "max_length_q": 4})
    assert torch.equal(cu, given) and longest == 4
    assert A.packed_boundaries(q1, k1[:, :, :3], None, {"cu_seq_lens_q": given}) is None  # a KV cache


@pytest.mark.parametrize("kwargs", [
    {"mask": True},                                            # a mask (padding): transformers' function
    {"dropout": 0.1},                                          # dropout: the kernel has none
    {"output_attentions": True},                               # weights asked for
    {"position_bias": torch.zeros(1)},                         # a score bias: not modelled
])
def test_calls_the_kernel_does_not_model_reach_transformers_function_unchanged(kwargs):
    q, k, v = _qkv()
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    packed = {} if "mask" in kwargs else {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 13}
    fallback = _Recorder()
    fn = A.packed_attention(fallback)
    dropout = kwargs.pop("dropout", 0.0)
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool) if kwargs.pop("mask", False) else None
    fn(_Module(), q, k, v, mask, dropout=dropout, scaling=0.3, position_ids=torch.arange(20)[None], **packed,
       **kwargs)
    assert len(fallback.calls) == 1
    seen = fallback.calls[0]
    assert seen["scaling"] == 0.3 and seen["dropout"] == dropout and all(k_ in seen for k_ in kwargs)


def test_packed_calls_run_the_kernel_per_document():
    q, k, v = _qkv(s=20)
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    fallback = _Recorder()
    out, weights = A.packed_attention(fallback)(_Module(), q, k, v, None, scaling=0.4, cu_seq_lens_q=cu,
                                                cu_seq_lens_k=cu, max_length_q=12, sliding_window=5)
    assert not fallback.calls and weights is None and out.shape == (1, 20, 4, 8)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):  # each document alone, GQA 2, window 5
        qd, kd, vd = q[..., s:e, :], k[..., s:e, :].repeat_interleave(2, 1), v[..., s:e, :].repeat_interleave(2, 1)
        i = torch.arange(e - s)
        allowed = (i[None] <= i[:, None]) & (i[None] > i[:, None] - 5)
        want = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=allowed, scale=0.4)
        torch.testing.assert_close(out[0, s:e], want[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_patched_models_route_packed_batches_and_unpatch_restores_them(model_type):
    """The report names the kernel; a packed batch with a KV cache created (eval, use_cache on: the
    case where transformers' SDPA path attends across documents) still keeps documents apart."""
    model = tiny.tiny_model(model_type)
    original = copy.deepcopy(model).eval()
    corept.patch(model)
    attn = corept.report(model).applied["attention"]
    assert attn.startswith("triton:varlen_attention"), attn
    model.eval()
    docs = documents(tiny.VOCAB, LENGTHS)
    batch = packed_batch(docs)
    del batch["labels"], batch["use_cache"]
    with torch.no_grad():
        packed = model(**batch, use_cache=True).logits[0]
        alone = torch.cat([original(input_ids=d[None]).logits[0] for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    corept.unpatch(model)
    layer = model.model.layers[0].self_attn
    assert "forward" not in layer.__dict__


def test_packed_batches_trace_into_compiled_layers_without_a_break():
    """A packed LoRA step with the decoder layers compiled (``aot_eager``): the varlen kernel's
    operator form is traced (no graph break), and loss and gradients equal the eager step."""
    from torch._dynamo.utils import counters

    from corept.testing.tolerances import assert_fp32_close

    base = tiny.tiny_model("llama")
    docs = documents(tiny.VOCAB, LENGTHS)
    outcomes = []
    torch._dynamo.reset()
    for option in (False, {"backend": "aot_eager"}):
        model = corept.get_peft_model(corept.patch(copy.deepcopy(base), compile=option), r=4, lora_alpha=8,
                                      use_gradient_checkpointing=False)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        breaks = sum(counters["graph_break"].values())
        model.train()
        loss = model(**packed_batch(docs)).loss
        loss.backward()
        outcomes.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        if option:
            assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
            assert "one region each" in corept.report(model).settings["compile"]
    (want, want_grads), (got, got_grads) = outcomes
    assert_fp32_close("loss", got, want)
    for name, grad in want_grads.items():
        assert_fp32_close(name, got_grads[name], grad)


@pytest.mark.parametrize("implementation,kernel", [("sdpa", False), ("eager", True)])
def test_unmasked_causal_rows_take_the_kernel_only_where_transformers_has_no_causal_kernel(implementation, kernel):
    """Plain causal rows without a mask: SDPA's own kernel is faster there (H100), so SDPA models keep
    it; an eager model (a materialized [S, S] score matrix otherwise) takes the varlen kernel."""
    fallback = _Recorder()

    class Registry:
        def get_interface(self, name, default):
            return fallback

    q, k, v = _qkv(s=10)
    fn = A.PackedInterfaces(Registry()).get_interface(implementation, None)
    out, _ = fn(_Module(), q, k, v, None, scaling=0.3, position_ids=torch.arange(10)[None])
    assert (not fallback.calls) == kernel
    if kernel:
        want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                                is_causal=True, scale=0.3)
        torch.testing.assert_close(out[0], want[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def _eager_masks(model_type: str, attention_mask=None, position_ids=None, s: int = 12, b: int = 2, **overrides):
    """The full and sliding masks transformers' own mask builders make for an eager model."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = tiny.tiny_config_of(model_type, sliding_window=5, **overrides)
    config._attn_implementation = "eager"
    kwargs = dict(config=config, inputs_embeds=torch.zeros(b, s, 8), attention_mask=attention_mask, cache=None,
                  position_ids=position_ids)
    return create_causal_mask(**kwargs), create_sliding_window_causal_mask(**kwargs)


def test_transformers_plain_causal_masks_are_recognised_and_nothing_else():
    full, sliding = _eager_masks("mistral")
    assert A.plain_causal(full, 2, 12, None) and A.plain_causal(sliding, 2, 12, 5)
    assert not A.plain_causal(full, 2, 12, 5) and not A.plain_causal(sliding, 2, 12, None)
    assert not A.plain_causal(sliding, 2, 12, 4) and not A.plain_causal(full, 2, 11, None)
    padded = torch.ones(2, 12, dtype=torch.long)
    padded[1, 9:] = 0
    assert not A.plain_causal(_eager_masks("mistral", attention_mask=padded)[0], 2, 12, None)
    assert A.plain_causal(_eager_masks("mistral", attention_mask=torch.ones(2, 12, dtype=torch.long))[0], 2, 12, None)
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]] * 2)  # transformers masks the documents apart
    assert not A.plain_causal(_eager_masks("mistral", position_ids=packed)[0], 2, 12, None)
    allowed = torch.ones(12, 12).tril().bool()
    assert A.plain_causal(allowed[None, None], 2, 12, None)
    assert not A.plain_causal(allowed[None, None] & (torch.rand(12, 12) > 0.1), 2, 12, None)
    biased = torch.zeros(1, 1, 12, 12).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert A.plain_causal(biased, 1, 12, None)
    assert not A.plain_causal(biased + 0.5 * allowed, 1, 12, None)  # an additive bias, not a mask


def test_a_mask_verdict_is_kept_per_window_and_version():
    full, _ = _eager_masks("mistral")
    assert A.plain_causal(full, 2, 12, None)
    assert list(getattr(full, A._VERDICTS)) == [(None, full._version)]
    full[0, 0, 3, 2] = torch.finfo(full.dtype).min  # changed in place: checked again
    assert not A.plain_causal(full, 2, 12, None)
    with torch.inference_mode():  # no version counter there
        assert A.plain_causal(_eager_masks("mistral")[0], 2, 12, None)


def test_eager_models_take_the_kernel_through_transformers_masks(monkeypatch):
    """A Mistral eager model (sliding window 5 < 12 tokens, GQA): every attention call, masked by
    transformers, runs the kernel, and logits and gradients equal the unpatched model's (fp32)."""
    calls = []
    kernel = A.varlen_attention
    monkeypatch.setattr(A, "varlen_attention", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    base = tiny.tiny_model("mistral", sliding_window=5, attn_implementation="eager").train()
    model = corept.patch(copy.deepcopy(base))
    ids = torch.randint(0, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 and all(c["window"] == 5 for c in calls)
    got, want = model(input_ids=ids, labels=ids).loss, base(input_ids=ids, labels=ids).loss  # fused loss: no logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward(), want.backward()
    grads = dict(base.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    padded = torch.ones_like(ids)
    padded[0, 8:] = 0
    calls.clear()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=padded).logits,
                               base(input_ids=ids, attention_mask=padded).logits, rtol=1e-5, atol=1e-5)
    assert not calls  # padding: transformers' function


def test_sinks_run_on_the_kernel_and_match_gpt_oss_attention(monkeypatch):
    """gpt-oss's ``s_aux``: the kernel's ``sinks=``; output and the q/k/v/sink gradients equal
    transformers' own eager gpt-oss attention (fp32), sliding window included."""
    from transformers.models.gpt_oss import modeling_gpt_oss as M

    calls = []
    kernel = A.varlen_attention
    monkeypatch.setattr(A, "varlen_attention", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, s=12))
    module = _Module()
    module.num_key_value_groups = 2
    module.sinks = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(2)))
    _, sliding = _eager_masks("gpt_oss", b=2, s=12)
    fn = A.PackedInterfaces(M.ALL_ATTENTION_FUNCTIONS).get_interface("eager", M.eager_attention_forward)
    kwargs = dict(scaling=0.3, sliding_window=5, s_aux=module.sinks, position_ids=torch.arange(12)[None])
    got, _ = fn(module, q, k, v, sliding, **kwargs)
    assert len(calls) == 1 and calls[0]["sinks"] is module.sinks and got.shape == (2, 12, 4, 8)
    want, _ = M.eager_attention_forward(module, q, k, v, sliding, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v, module.sinks), dout)
    wants = torch.autograd.grad(want, (q, k, v, module.sinks), dout)
    for name, g, w in zip("qkv", grads, wants):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(grads[3], wants[3], rtol=1e-4, atol=1e-5, msg="sinks")
