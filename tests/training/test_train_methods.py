"""TRL's SFT, DPO and KTO trainers, unmodified, train corept models: 16-bit LoRA, QLoRA and full.

Each run: a tiny Llama loaded and patched by corept, six optimizer steps on memorizable rows; the
loss must be finite and fall, and corept's patches (norm, MLP, RoPE; LoRA kernels for adapters)
must be what ran. LoRA references are the adapter-disabled policy (``ref_model=None``); full
fine-tuning DPO/KTO gets an explicit frozen copy.
"""
import pytest
import torch
import training_helpers as h

import corept
from corept.training.compat import trl_head_scope
from corept.training.trainers import build_trainer

CASES = [(m, mode) for m in ("sft", "dpo", "kto") for mode in ("lora", "qlora", "full")]


@pytest.mark.parametrize("method,mode", CASES, ids=[f"{m}-{mode}" for m, mode in CASES])
def test_trl_trains_corept_model(tiny_chat, method, mode):
    model, tok = h.load(tiny_chat, mode)
    applied = corept.report(model).applied
    for component in ("norm", "mlp", "rope", "loss"):
        assert component in applied, (component, applied)
    if mode != "full":
        assert "lora_mlp" in applied["lora"] and "lora_o" in applied["lora"], applied
    with trl_head_scope(model):
        trainer = build_trainer(method, model, tok, h.dataset(method), h.options(method, mode))
        if method in ("dpo", "kto"):
            assert (trainer.ref_model is None) == (mode != "full")  # LoRA: reference = adapter disabled
        trainer.train()
    h.assert_falling(h.losses(trainer))
    if mode == "qlora":
        assert getattr(model, "is_loaded_in_4bit", False)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(torch.isfinite(p).all() for p in trained)


def test_full_finetuning_reference_stays_frozen(tiny_chat):
    """DPO full fine-tuning: the explicit reference copy does not move while the policy does."""
    model, tok = h.load(tiny_chat, "full")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with trl_head_scope(model):
        trainer = build_trainer("dpo", model, tok, h.dataset("dpo"), h.options("dpo", "full", max_steps=3))
        trainer.train()
    ref = trainer.ref_model
    assert ref is not model
    moved = sum(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert moved > 0
    for n, p in ref.named_parameters():
        assert torch.equal(p, before[n]), n
        assert not p.requires_grad
