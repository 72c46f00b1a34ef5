"""The numerical checks of the conformance suite: patched vs reference tensors, generation, training."""
from __future__ import annotations

import copy

import torch

import corept
from corept.testing import builders as B
from corept.testing import checks as C
from corept.testing import routing
from corept.testing.store import same
from corept.testing.tolerances import scaled_error


class NumericChecks:
    """Mixed into :class:`~corept.testing.ConformanceSuite` (its attributes and helpers)."""

    def test_quirk_is_exercised(self, corept_store, config_name):
        """Changing each probed config attribute changes the reference logits (so a patch that
        ignored the quirk would fail the matrix)."""
        batch = corept_store.batch(config_name)
        ref = C.eval_logits(corept_store.base(config_name), batch)
        for attr, value in self.quirk_probes[config_name].items():
            cfg = corept_store.config(config_name)
            for c in {id(cfg): cfg, id(cfg.get_text_config()): cfg.get_text_config()}.values():
                setattr(c, attr, value)
            changed = B.build_base(cfg, self.model_classes.get(config_name), self.seed)
            err = scaled_error(C.eval_logits(changed, batch), ref)
            assert err > 1e-3, f"{attr}={value!r} changes the logits by only {err:.2e}: the quirk is not exercised"

    def test_matrix(self, corept_store, case):
        """Logits, loss (-100 labels, num_items_in_batch), every trainable gradient: patched vs reference."""
        pat, ref, gold = self.models(corept_store, case)
        rep = corept.report(pat)
        batch = corept_store.batch(case.config)
        nib = case.patch in ("all", "loss")
        experts = corept_store.arch(case.config).roles.experts
        gold_out = None
        if gold is not None and experts:  # bf16 with experts: the gold's routing for all (corept.testing.routing)
            with routing.recorded(gold, experts) as routes:
                gold_out = self.run_case(gold, batch, case, nib)
            with routing.pinned(pat, experts, routes), routing.pinned(ref, experts, routes):
                got, want = self.run_case(pat, batch, case, nib), self.run_case(ref, batch, case, nib)
        else:
            got, want = self.run_case(pat, batch, case, nib), self.run_case(ref, batch, case, nib)
        applied = [c for c in rep.applied if c != "lora"]
        if not applied and not case.lora and not case.ckpt:
            # nothing was patched for this selection (e.g. attention on AttentionInterface): bitwise
            assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
            assert all(same(got.grads[n], want.grads[n]) for n in want.grads)
            assert case.patch not in self.applied_components(corept_store, case.config), rep
            return
        if case.patch != "all":
            assert case.patch in rep.applied, f"{case.patch} selected but not applied: {rep.fallbacks}"
        if "loss" in rep.applied:
            assert not got.logits_in_training, "loss is reported fused, but the training forward returned logits"
        if case.lora:
            assert "lora" in rep.applied or rep.fallbacks.get("lora"), rep
            C.assert_state_dict_equal(pat.state_dict(), ref.state_dict(), "LoRA model")
        if gold is not None and gold_out is None:
            gold_out = self.run_case(gold, batch, case, nib)
        compared = C.compare(got, want, gold_out)
        assert compared >= sum(g is not None for g in want.grads.values()) + 1

    def test_generate_greedy(self, corept_store, config_name):
        """Greedy generate() with the KV cache (left padding): the same tokens as the reference."""
        base = corept_store.base(config_name)
        batch = B.generation_batch(B.vocab_size(base), self.batch_size, self.seq_len)
        want = C.greedy(copy.deepcopy(base), batch, self.new_tokens)
        got = C.greedy(corept.patch(copy.deepcopy(base)), batch, self.new_tokens)
        assert got.shape == want.shape == (self.batch_size, self.seq_len + self.new_tokens)
        assert torch.equal(got, want), f"patched {got.tolist()} != reference {want.tolist()}"

    def test_convergence(self, corept_store, config_name):
        """``convergence_steps`` (12) LoRA steps (AdamW) patched vs unpatched from one seed on the same
        batches: per-step losses agree (fp32, rtol ``convergence_rtol``) and the loss goes down."""
        base = corept_store.base(config_name)
        targets = B.lora_targets(base, corept_store.arch(config_name))
        models = [B.add_lora(corept.patch(copy.deepcopy(base)), patched=True, targets=targets,
                             rank=self.lora_rank, checkpointing=False),
                  B.add_lora(copy.deepcopy(base), patched=False, targets=targets, rank=self.lora_rank,
                             checkpointing=False)]
        opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=self.convergence_lr)
                for m in models]
        batches = [corept_store.batch(config_name, seed=100 + i) for i in range(4)]
        losses = [[], []]
        for step in range(self.convergence_steps):
            for i, (m, opt) in enumerate(zip(models, opts)):
                res = C.train_pass(m, batches[step % len(batches)])
                losses[i].append(res.loss.item())
                opt.step()
                opt.zero_grad(set_to_none=True)
        got, want = torch.tensor(losses[0]), torch.tensor(losses[1])
        torch.testing.assert_close(got, want, rtol=self.convergence_rtol, atol=0.0,
                                   msg=lambda m: f"per-step losses differ:\n{got.tolist()}\n{want.tolist()}\n{m}")
        assert want[-4:].mean() < want[:4].mean() - 0.05, f"the loss did not go down: {want.tolist()}"

    def test_generate_without_mask(self, corept_store, config_name):
        """Left-padded prompts given to ``generate()`` without an attention mask: the same tokens as the
        reference (transformers builds the mask from the forward's signature, which corept keeps)."""
        base = corept_store.base(config_name)
        batch = B.generation_batch(B.vocab_size(base), self.batch_size, self.seq_len)
        ids = {"input_ids": batch["input_ids"]}
        want = C.greedy(copy.deepcopy(base), ids, self.new_tokens)
        got = C.greedy(corept.patch(copy.deepcopy(base)), ids, self.new_tokens)
        assert torch.equal(got, want), f"patched {got.tolist()} != reference {want.tolist()}"
