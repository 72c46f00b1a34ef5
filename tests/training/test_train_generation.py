"""Inference after training: generate() gives the same greedy tokens patched and unpatched."""
import pytest
import training_helpers as h

from corept.training.compat import trl_head_scope
from corept.training.generation import patched_unpatched_check
from corept.training.trainers import build_trainer


@pytest.mark.parametrize("method,mode", [("sft", "lora"), ("kto", "lora"), ("sft", "full")])
def test_greedy_tokens_identical_after_training(tiny_chat, method, mode):
    model, tok = h.load(tiny_chat, mode)
    with trl_head_scope(model):
        build_trainer(method, model, tok, h.dataset(method), h.options(method, mode, max_steps=3)).train()
    patched_forwards = sum("forward" in m.__dict__ for m in model.modules())
    assert patched_forwards > 0  # corept's kernels are in place for the first generation
    check = patched_unpatched_check(model, tok, h.Q, max_new_tokens=16)
    assert sum("forward" in m.__dict__ for m in model.modules()) == 0  # the second one ran unpatched
    assert len(check.patched) > 0
    assert check.equal, check.line()
