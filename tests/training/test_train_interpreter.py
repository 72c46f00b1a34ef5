"""TRL training through corept's Triton kernels (the Triton interpreter on CPU), not their torch twins.

The other training tests run the kernels' torch twins for speed (see conftest.py). Here the
interpreter stays on: the report names ``triton:`` implementations and one SFT step through TRL
with LoRA gives finite gradients on every adapter and a loss equal to the torch twins' loss.
"""
import pytest
import torch
import training_helpers as h

import corept
from corept.training.compat import trl_head_scope
from corept.training.trainers import build_trainer


def _one_step(folder):
    torch.manual_seed(0)
    model, tok = h.load(folder, "lora", checkpointing=False)
    with trl_head_scope(model):
        trainer = build_trainer("sft", model, tok, h.dataset("sft", 2), h.options("sft", max_steps=1, batch_size=2))
        trainer.train()
    return model, h.losses(trainer)


@pytest.mark.triton_interpreter
def test_sft_step_runs_triton_kernels(tiny_chat, monkeypatch):
    model, losses = _one_step(tiny_chat)
    applied = corept.report(model).applied
    assert all(applied[c].startswith("triton:") for c in ("norm", "rope", "mlp")), applied
    assert "triton:lora_mlp" in applied["lora"], applied
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, twin_losses = _one_step(tiny_chat)
    assert losses and losses == pytest.approx(twin_losses, rel=1e-5)
