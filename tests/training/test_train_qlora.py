"""QLoRA on CPU after eval forwards: the bitsandbytes repack trap stays closed on corept's paths.

On AVX512-BF16 CPUs an eval forward under ``no_grad`` repacks ``Linear4bit`` weights for a matmul
without autograd; later training silently loses its input gradients. ``corept.load`` disables it.
These tests generate first (eval, no_grad), then train and check every LoRA gradient exists and
equals the gradient of a float model built from the dequantized 4-bit weights.
"""
import bitsandbytes.functional as bnbf
import pytest
import torch
import training_helpers as h

import corept
from corept.training.compat import guard_4bit, trl_head_scope
from corept.training.generation import answer
from corept.training.trainers import build_trainer


def _loss(model, tok):
    enc = tok(["What is corept? corept patches transformers models.", "Triton kernels"], return_tensors="pt",
              padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model.train()
    return model(**enc, labels=labels).loss


def _lora_grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}


def _float_twin(folder, qmodel):
    """The same model in fp32 with each 4-bit weight replaced by its dequantized value, same adapters."""
    model, _ = corept.load(folder)
    qbase = qmodel.get_base_model()
    with torch.no_grad():
        for name, m in qbase.named_modules():
            state = getattr(getattr(m, "weight", None), "quant_state", None)
            if state is not None:
                dense = bnbf.dequantize_4bit(m.weight.data, state).float()
                model.get_submodule(name.replace(".base_layer", "")).weight.copy_(dense)
    model = corept.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    q_params = dict(qmodel.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(q_params[n].float())
    return model


def _grads_after_eval_forward(folder, *, allow_repack: bool):
    """LoRA grads of a QLoRA model after a generate() call, and those of its dequantized float twin."""
    model, tok = h.load(folder, "qlora", checkpointing=False)
    if allow_repack:  # bitsandbytes' own default on AVX512-BF16 CPUs
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = True
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B so every A gets a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    twin = _float_twin(folder, model)  # before any eval forward
    answer(model, tok, "What is corept?", max_new_tokens=4)  # eval forward under no_grad
    _loss(model, tok).backward()
    _loss(twin, tok).backward()
    return model, _lora_grads(model), _lora_grads(twin)


def test_qlora_gradients_after_eval_forward_match_dequantized(tiny_chat):
    model, got, want = _grads_after_eval_forward(tiny_chat, allow_repack=False)
    assert guard_4bit(model) > 0  # nothing was repacked
    assert got.keys() == want.keys() and len(got) > 0
    for n, g in got.items():
        assert g is not None, f"{n}: no gradient (4-bit weights repacked?)"
        torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("method", ["sft", "dpo", "kto"])
def test_qlora_trl_training_keeps_gradients(tiny_chat, method):
    """Generate (eval), train with TRL, generate again, and still every LoRA parameter gets a gradient."""
    model, tok = h.load(tiny_chat, "qlora")
    answer(model, tok, "What is corept?", max_new_tokens=4)
    with trl_head_scope(model):
        trainer = build_trainer(method, model, tok, h.dataset(method), h.options(method, "qlora", max_steps=2))
        trainer.train()
    answer(model, tok, "What is corept?", max_new_tokens=4)
    guard_4bit(model)
    model.zero_grad()
    _loss(model, tok).backward()
    grads = _lora_grads(model)
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert grads and not missing, missing[:5]


@pytest.mark.skipif(not bnbf.has_avx512bf16(), reason="the repack only happens on CPUs with AVX512-BF16")
def test_repack_trap_is_real(tiny_chat):
    """Control: with bitsandbytes' default (repack allowed) the same steps give wrong gradients."""
    model, got, want = _grads_after_eval_forward(tiny_chat, allow_repack=True)
    with pytest.raises(RuntimeError, match="repacked"):
        guard_4bit(model)
    wrong = [n for n, g in got.items() if g is None or not torch.allclose(g, want[n], rtol=1e-4, atol=1e-6)]
    assert wrong, "expected the repacked 4-bit weights to corrupt the gradients"
