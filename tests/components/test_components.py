"""Wiring check per architecture: patched vs never-patched HF model, fp32 on CPU.

TRITON_INTERPRET=1 (conftest) makes the real Triton kernels run through the interpreter, and the
report must say so (``triton:...``): a silent fall-back to the torch twins would not test them.
Shapes are tiny (batch 2, seq 8). The deeper per-plugin conformance kit lives elsewhere.
"""
from __future__ import annotations

import copy

import pytest
import torch

import corept
import tiny

RTOL, ATOL = 1e-4, 1e-5
IDS, LABELS = tiny.batch()

# model_type -> (plugin, number of norm modules the plugin patches, MLP kernel or None)
EXPECTED = {
    "llama": ("llama", 5, "swiglu"),
    "mistral": ("mistral", 5, "swiglu"),
    "qwen2": ("qwen", 5, "swiglu"),
    "qwen3": ("qwen", 9, "swiglu"),           # + q_norm/k_norm per layer
    "qwen3_moe": ("qwen", 9, None),          # experts: grouped GEMMs (expert_linear), no gated MLP
    "gemma": ("gemma", 5, "geglu"),
    "gemma2": ("gemma", 9, "geglu"),         # + pre/post feed-forward norms
    "gemma3_text": ("gemma", 13, "geglu"),   # + both of the above
}


def _kernel_functions(loss: torch.Tensor) -> set[str]:
    """Modules of the custom autograd Functions in ``loss``'s backward graph."""
    seen, stack, modules = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        cls = getattr(fn, "_forward_cls", None)
        if cls is not None:
            modules.add(cls.__module__)
        stack.extend(f for f, _ in fn.next_functions)
    return modules


@pytest.mark.parametrize("model_type", list(EXPECTED))
def test_patched_matches_hf(model_type):
    plugin, n_norms, mlp_kernel = EXPECTED[model_type]
    model = tiny.tiny_model(model_type)
    attn = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    assert attn.head_dim == (tiny.HIDDEN // 4 if model_type == "qwen2" else tiny.HEAD_DIM)  # != hidden/heads
    ref = copy.deepcopy(model)
    corept.patch(model)
    r = corept.report(model)

    assert (r.plugin, r.model_type) == (plugin, model_type)
    expected_applied = {"norm": f"triton:rms_norm x{n_norms}", "rope": "triton:rope x2",
                        "loss": "triton:fused_linear_cross_entropy x1", "attention": "triton:varlen_attention x2"}
    if mlp_kernel:
        expected_applied["mlp"] = f"triton:{mlp_kernel} x2"
    experts = model_type == "qwen3_moe"
    if experts:
        expected_applied["experts"] = "triton:expert_linear x2"
    assert r.applied == expected_applied
    assert set(r.fallbacks) == ({"mlp"} if not mlp_kernel else set()), r.fallbacks

    # eval: logits, and the (unfused) loss with labels
    with torch.no_grad():
        got, want = model(IDS, labels=LABELS), ref(IDS, labels=LABELS)
    torch.testing.assert_close(got.logits, want.logits, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got.loss, want.loss, rtol=RTOL, atol=ATOL)

    # train: the fused linear cross-entropy path, then every gradient
    model.train()
    ref.train()
    out, ref_out = model(IDS, labels=LABELS), ref(IDS, labels=LABELS)
    assert out.logits is None, "training with labels must take the fused loss path (no logits)"
    # the Triton paths really ran (not the kernels' silent torch twins): their autograd Functions
    # are in the graph
    want_modules = {"norms", "rope", "fused_linear_ce"} | ({"glu"} if mlp_kernel else set()) | (
        {"ops.experts"} if experts else set())
    assert {f"corept_kernels.{m}" for m in want_modules} <= _kernel_functions(out.loss)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=RTOL, atol=ATOL)
    out.loss.backward()
    ref_out.loss.backward()
    grads = dict(model.named_parameters())
    checked = 0
    for name, p_ref in ref.named_parameters():
        g, g_ref = grads[name].grad, p_ref.grad
        if g_ref is None:  # e.g. an MoE expert no token was routed to
            assert g is None, name
            continue
        assert g is not None, f"{name}: no gradient through the patched model"
        torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    assert checked >= len(grads) - (12 if model_type == "qwen3_moe" else 0)


def test_gemma3_multimodal_patches_the_text_path_only():
    import transformers as tf

    text = tiny.tiny_config("gemma3_text")
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=32, patch_size=16)
    config = tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                             image_token_index=5, boi_token_index=3, eoi_token_index=4)
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    ref = copy.deepcopy(model)
    corept.patch(model)
    r = corept.report(model)
    assert (r.plugin, r.model_type) == ("gemma", "gemma3")
    assert set(r.applied) == {"norm", "mlp", "rope", "attention"}  # no loss: the multimodal head keeps transformers'
    assert r.applied["norm"] == "triton:rms_norm x14"  # text norms (13) + the multimodal projector's
    assert r.fallbacks["loss"].startswith("plugin 'gemma' keeps it") and "multimodal" in r.fallbacks["loss"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ref(input_ids=IDS).logits, rtol=RTOL, atol=ATOL)


def test_quirks_reach_the_patches():
    """Resolved quirks in the report are read from the config (softcaps, sliding window, scale)."""
    model = corept.patch(tiny.tiny_model("gemma2"))
    q = corept.report(model).quirks
    cfg = model.config
    assert q["attn_softcap"] == cfg.attn_logit_softcapping == 50.0
    assert q["final_logit_softcap"] == cfg.final_logit_softcapping == 30.0
    assert q["sliding_window"] == cfg.sliding_window == 4
    assert q["query_pre_attn_scalar"] == "the attention scaling, applied inside transformers' attention"
    assert (q["norm_offset"], q["norm_casting"], q["mlp_activation"]) == (1.0, "scale_in_fp32", "geglu_tanh")
