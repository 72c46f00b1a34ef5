"""corept's patches and TRL's trainers on one model: the fused LM head, unpatch, checkpointing.

TRL's DPO/KTO/SFT trainers call ``add_fused_lm_head``, which wraps ``model.forward`` (corept's
causal-LM forward on a patched model). Both paths must stay right: plain calls with labels still
take corept's fused linear cross-entropy, ``fused_lm_head=True`` calls give the reference
log-probs, and gradients match an unpatched model.
"""
import logging

import pytest
import torch
import training_helpers as h
from trl.trainer.utils import add_fused_lm_head

import corept
from corept.training.compat import base_model, checkpointing_functions, has_trl_head, trl_head_scope
from corept.training.trainers import build_trainer


def _batch(vocab: int):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, vocab, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    return ids, labels


def _reference_logprobs(ref, ids, labels):
    logits = ref(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(target == -100, 0.0)


def _models(folder):
    model, _ = corept.load(folder)
    ref, _ = corept.load(folder, patch=False)
    return model.train(), ref.train()


def test_fused_head_composes_with_corept_loss(tiny_chat):
    model, ref = _models(tiny_chat)
    add_fused_lm_head(model)
    assert has_trl_head(model)
    ids, labels = _batch(model.config.vocab_size)

    out = model(input_ids=ids, labels=labels)  # not fused_lm_head: TRL's wrapper calls corept's forward
    assert out.logits is None, "corept's fused linear cross-entropy should have computed the loss"
    expected = ref(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss)
    out.loss.backward()
    expected.loss.backward()
    for name in ("lm_head.weight", "model.norm.weight", "model.layers.0.mlp.up_proj.weight"):
        torch.testing.assert_close(model.get_parameter(name).grad, ref.get_parameter(name).grad, msg=name)
    model.zero_grad()
    ref.zero_grad()

    fused = model(input_ids=ids, labels=labels, fused_lm_head=True)  # TRL's head over corept's backbone
    ref_lp = _reference_logprobs(ref, ids, labels)
    torch.testing.assert_close(fused.log_probs, ref_lp)
    fused.log_probs.sum().backward()
    ref_lp.sum().backward()
    torch.testing.assert_close(model.model.norm.weight.grad, ref.model.norm.weight.grad)


def test_unpatch_leaves_trl_head_in_place(tiny_chat, caplog):
    """corept.unpatch cannot remove a forward TRL wrapped: it warns, keeps TRL's wrapper (which still
    calls corept's forward, numerically transformers'), and undoes everything else."""
    model, ref = _models(tiny_chat)
    add_fused_lm_head(model)
    caplog.set_level(logging.WARNING, logger="corept")
    corept.unpatch(model)
    assert "replaced after corept patched it" in caplog.text
    assert has_trl_head(model)
    assert [n for n, m in model.named_modules() if "forward" in m.__dict__] == [""]
    model.eval()
    ref.eval()
    ids, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        torch.testing.assert_close(model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs,
                                   _reference_logprobs(ref, ids, labels))


def test_trl_head_scope_makes_unpatch_exact(tiny_chat, caplog):
    model, tok = h.load(tiny_chat, "lora")
    before = base_model(model).__dict__["forward"]
    with trl_head_scope(model):
        trainer = build_trainer("dpo", model, tok, h.dataset("dpo"), h.options("dpo", max_steps=1))
        assert has_trl_head(model)
        trainer.train()
    assert not has_trl_head(model) and base_model(model).__dict__["forward"] is before
    caplog.set_level(logging.WARNING, logger="corept")
    corept.unpatch(model)
    assert "replaced after" not in caplog.text
    leftovers = [n for n, m in model.named_modules()  # corept_load_options records how it was loaded: not a patch
                 if any(k == "forward" or ("corept" in k and k != "corept_load_options") for k in m.__dict__)]
    assert leftovers == []


@pytest.mark.parametrize("method,mode", [("sft", "lora"), ("sft", "full"), ("dpo", "lora"), ("kto", "lora")])
def test_corept_checkpointing_survives_trl(tiny_chat, method, mode):
    """TRL's config says gradient_checkpointing=False, so HF's Trainer keeps corept's checkpoint
    function; DPO/KTO switch checkpointing off and on around the reference pass, and corept's
    function must come back after it (not transformers' own)."""
    from corept.training.trainers import enable_full_checkpointing

    model, tok = h.load(tiny_chat, mode, checkpointing="corept")
    if mode == "full":
        enable_full_checkpointing(model, "corept")
    funcs = checkpointing_functions(model)
    assert len(funcs) == 1 and "make_checkpoint_func" in next(iter(funcs)).__qualname__
    with trl_head_scope(model):
        trainer = build_trainer(method, model, tok, h.dataset(method), h.options(method, mode, max_steps=2))
        trainer.train()
    assert checkpointing_functions(model) == funcs
    h.assert_falling(h.losses(trainer))
