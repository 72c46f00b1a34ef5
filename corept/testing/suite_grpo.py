"""The conformance suite's GRPO checks: one step of TRL's ``GRPOTrainer`` loss on a plugin's model.

TRL's trainer is used unmodified. One group of completions is sampled once, from the patched
model's own ``generate()`` (KV cache), and scored by a reward that varies with the completion's
tokens, so the advantages are not all zero. The same inputs then go through TRL's loss on the
patched model with LoRA and on the unpatched reference with identical adapters:

* fp32: the loss and every adapter gradient agree tightly, with the KL term on (``beta > 0``). The
  adapters are re-drawn after sampling (the same values on both models), so the policy has moved
  away from the sampling-time reference and the KL term and its gradient are not zero;
* bf16: the patched loss and gradients are within the project's rule (twice the unpatched bf16
  run's own error against an fp32 gold copy); a mixture-of-experts model's routing is pinned to
  the gold's (:mod:`corept.testing.routing`).

Needs TRL (``trl>=1.16``): without it the checks skip and say so.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util

import pytest
import torch

import corept
from corept.testing import builders as B
from corept.testing import routing
from corept.testing.tolerances import assert_bf16_within, assert_fp32_close

#: the prompt text; the tiny tokenizer is trained on it and on digits, so it encodes without <unk>
PROMPT = "What is 2 + 3? Answer: "
GROUP = 4  # completions per prompt (TRL's num_generations); one prompt per step
COMPLETION = 5  # tokens sampled per completion at most
MOVED = 13  # seed of the adapters the fp32 check trains after sampling


def _token_reward(completion_ids=None, **_):
    """A reward read from the completion's token ids (tiny tokenizers decode random ids poorly)."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def _tokenizer(vocab: int):
    from corept.tiny import tiny_tokenizer

    return tiny_tokenizer([PROMPT, "0123456789 +-=?"] * 4, vocab_size=min(vocab, 300))


def _trainer(model, tok, out_dir, beta: float):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=GROUP, num_generations=GROUP,
                     max_completion_length=COMPLETION, use_cpu=True, bf16=False, report_to="none",
                     save_strategy="no", gradient_checkpointing=False, loss_type="dapo", beta=beta, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[_token_reward], args=cfg,
                          train_dataset=Dataset.from_list([{"prompt": PROMPT}] * GROUP), processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before the first step
    return trainer


def _sample(trainer, model) -> dict:
    """One scored group (TRL's own generation and scoring), sampled from ``model``."""
    model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([{"prompt": PROMPT}] * GROUP)
    assert inputs["advantages"].abs().sum() > 0, "every advantage is zero: the check could not fail"
    return inputs


def _loss_and_grads(trainer, model, inputs) -> tuple[torch.Tensor, dict]:
    model.train()
    for p in model.parameters():
        p.grad = None
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def _without_trl_ref(model) -> None:
    """TRL copies the adapter to ``ref`` when ``beta > 0``; the next trainer on ``model`` makes its own."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


class GRPOChecks:
    """Mixed into :class:`~corept.testing.ConformanceSuite` (its attributes and helpers)."""

    def _grpo_models(self, store, name, dtype):
        if importlib.util.find_spec("trl") is None:
            pytest.skip("TRL is not installed: the GRPO checks run TRL's GRPOTrainer (pip install 'trl>=1.16')")
        from corept.training.compat import trl_head_scope

        base = store.base(name)
        kw = dict(targets=B.lora_targets(base, store.arch(name)), rank=self.lora_rank, checkpointing=False)
        patched = B.add_lora(corept.patch(copy.deepcopy(base).to(dtype)), patched=True, **kw)
        ref = B.add_lora(copy.deepcopy(base).to(dtype), patched=False, **kw)
        return patched, ref, kw, trl_head_scope

    def test_grpo_step_matches_reference_fp32(self, corept_store, config_name, tmp_path):
        """fp32, KL term on: TRL's GRPO loss and every adapter gradient, patched == unpatched."""
        patched, ref, _, scope = self._grpo_models(corept_store, config_name, torch.float32)
        tok = _tokenizer(B.vocab_size(ref))
        with scope(patched):
            trainer = _trainer(patched, tok, tmp_path / "patched", beta=0.1)
            inputs = _sample(trainer, patched)
            B.randomize_lora(patched, seed=MOVED)
            got_loss, got = _loss_and_grads(trainer, patched, inputs)
        with scope(ref):
            trainer = _trainer(ref, tok, tmp_path / "ref", beta=0.1)
            B.randomize_lora(ref, seed=MOVED)
            want_loss, want = _loss_and_grads(trainer, ref, inputs)
        assert_fp32_close("GRPO loss", got_loss, want_loss)
        assert got.keys() == want.keys()
        for name in want:
            assert_fp32_close(f"grad[{name}]", got[name], want[name])

    def test_grpo_step_bf16_within_rule(self, corept_store, config_name, tmp_path):
        """bf16: the patched loss and adapter gradients within twice the unpatched bf16 error against
        an fp32 gold copy."""
        patched, ref, kw, scope = self._grpo_models(corept_store, config_name, torch.bfloat16)
        gold = B.add_lora(B.to_fp32_gold(copy.deepcopy(corept_store.base(config_name)).to(torch.bfloat16)),
                          patched=False, **kw)
        tok = _tokenizer(B.vocab_size(ref))
        experts = corept_store.arch(config_name).roles.experts
        with scope(patched):
            inputs = _sample(_trainer(patched, tok, tmp_path / "sample", beta=0.0), patched)
        _without_trl_ref(patched)
        results, routes = {}, {}
        for tag, model in (("gold", gold), ("patched", patched), ("ref", ref)):  # gold first: its routing
            with scope(model), contextlib.ExitStack() as stack:
                if experts:  # pinned for the bf16 models (corept.testing.routing)
                    if tag == "gold":
                        routes = stack.enter_context(routing.recorded(model, experts))
                    else:
                        stack.enter_context(routing.pinned(model, experts, routes))
                trainer = _trainer(model, tok, tmp_path / tag, beta=0.0)
                results[tag] = _loss_and_grads(trainer, model, inputs)
            _without_trl_ref(model)
        (loss_p, got), (loss_r, unpatched), (loss_g, golden) = results["patched"], results["ref"], results["gold"]
        assert_bf16_within("GRPO loss", loss_p, loss_r, loss_g)
        assert got.keys() == golden.keys()
        for name in golden:
            assert_bf16_within(f"grad[{name}]", got[name], unpatched[name], golden[name])
