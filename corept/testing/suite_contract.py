"""The contract checks of the conformance suite: declarations, the live report, faithful
signatures, undo, state dict and load policies."""
from __future__ import annotations

import copy

import pytest
import torch

import corept
from corept.testing import builders as B
from corept.testing import checks as C
from corept.testing import live
from corept.testing.store import same
from corept.testing.tolerances import scaled_error


class ContractChecks:
    """Mixed into :class:`~corept.testing.ConformanceSuite` (its attributes and helpers)."""

    def test_config_is_demanding(self, corept_store, config_name):
        """GQA > 1, head_dim != hidden/heads, non-power-of-two vocab, seq > any sliding window."""
        text = corept_store.config(config_name).get_text_config()
        heads, kv = text.num_attention_heads, getattr(text, "num_key_value_heads", text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        problems = []
        if not heads // kv > 1:
            problems.append(f"GQA: {heads} query heads / {kv} kv heads")
        if head_dim == text.hidden_size // heads:
            problems.append(f"head_dim {head_dim} == hidden {text.hidden_size} / heads {heads}")
        if text.vocab_size & (text.vocab_size - 1) == 0:
            problems.append(f"vocab {text.vocab_size} is a power of two")
        window = corept_store.arch(config_name).recorded.sliding_window
        layer_types = getattr(text, "layer_types", None) or ["sliding_attention"]
        used = "sliding_attention" in layer_types and getattr(text, "use_sliding_window", True) is not False
        if window and used and self.seq_len <= window:
            problems.append(f"seq_len {self.seq_len} <= sliding_window {window}: the window never bites")
        assert not problems, f"{config_name}: tiny config does not force: {problems}"

    def test_declaration_and_report(self, corept_store, config_name):
        """The right plugin owns it, quirks resolve as expected, components apply with Triton kernels."""
        model = corept.patch(copy.deepcopy(corept_store.base(config_name)))
        rep = corept.report(model)
        if self.plugin is not None:
            assert rep.plugin == self.plugin, rep
        for quirk, value in self.expected_quirks.get(config_name, {}).items():
            assert rep.quirks[quirk] == value, f"quirk {quirk}: {rep.quirks[quirk]!r} != expected {value!r}"
        from corept_kernels import interpreter_active

        triton_possible = interpreter_active() or torch.cuda.is_available()
        for comp in self.applied_components(corept_store, config_name):
            assert comp in rep.applied, f"{comp} not applied; why: {rep.fallbacks.get(comp, rep.fallbacks)}"
            if triton_possible:  # a kernel-backed part runs its Triton kernel; a plugin's own names pass as they are
                assert not any(p.startswith("torch:") for p in rep.applied[comp].split(", ")), (rep.applied,
                                                                                               rep.fallbacks)
        for comp, why in rep.fallbacks.items():
            assert why and isinstance(why, str), f"fallback {comp} has no reason"
        forced = corept_store.arch(config_name).load.forced_attn_implementation
        if forced:  # the kit builds models the way corept.load does
            assert model.config._attn_implementation == forced, model.config._attn_implementation

    def test_unpatch_identity(self, corept_store, config_name):
        """patch -> run -> unpatch leaves every module as before and outputs bitwise equal."""
        base = corept_store.base(config_name)
        model, never = copy.deepcopy(base), copy.deepcopy(base)
        before = C.instance_state(model)
        corept.patch(model)
        assert C.instance_state(model) != before, "patch changed nothing"
        batch = corept_store.batch(config_name)
        C.eval_logits(model, batch)
        corept.unpatch(model)
        assert C.instance_state(model) == before, "unpatch left instance attributes changed"
        assert not corept.is_patched(model)
        assert torch.equal(C.eval_logits(model, batch), C.eval_logits(never, batch))
        got, want = C.train_pass(model, batch), C.train_pass(never, batch)
        assert torch.equal(got.loss, want.loss)
        assert all(same(got.grads[n], want.grads[n]) for n in want.grads)

    def test_patch_idempotent(self, corept_store, config_name):
        """Patching twice changes nothing more (same objects, same report); one unpatch undoes it."""
        model = copy.deepcopy(corept_store.base(config_name))
        before = C.instance_state(model)
        corept.patch(model)
        once, rep = C.instance_state(model), copy.deepcopy(corept.report(model).to_dict())
        corept.patch(model)
        corept.patch(model, only=["norm"])  # a different selection is refused (warned), not stacked
        assert C.instance_state(model) == once
        assert corept.report(model).to_dict() == rep
        corept.unpatch(model)
        assert C.instance_state(model) == before

    def test_state_dict_unchanged(self, corept_store, config_name):
        """Patching adds, removes and changes no parameter or buffer, before and after a forward."""
        base = corept_store.base(config_name)
        model = corept.patch(copy.deepcopy(base))
        C.assert_state_dict_equal(model.state_dict(), base.state_dict(), "patched")
        C.train_pass(model, corept_store.batch(config_name), backward=False)
        C.assert_state_dict_equal(model.state_dict(), base.state_dict(), "patched after a forward")
        assert [n for n, _ in model.named_buffers()] == [n for n, _ in base.named_buffers()]

    def test_load_applies_policies(self, corept_store, config_name):
        """``corept.load`` of a saved copy picks this plugin, forces the declared attention, patches."""
        if self.model_classes.get(config_name):
            pytest.skip("corept.load builds AutoModelForCausalLM; this config names another class")
        model, tok = corept.load(str(corept_store.folder(config_name)), dtype="fp32")
        arch = corept_store.arch(config_name)
        assert corept.report(model).plugin == (self.plugin or corept.report(model).plugin)
        assert corept.report(model).patched
        forced = arch.load.forced_attn_implementation
        if forced:
            assert model.config._attn_implementation == forced

    def test_quirks_are_declared(self, corept_store, config_name):
        """Every scalar multiplier / scale / softcap field of the config that changes the reference
        logits is declared by the architecture (read by a ``FromConfig`` or listed in
        ``Recorded.config``): an unhandled one fails here, with its name."""
        from corept.tiny import scalar_fields

        config = corept_store.config(config_name)
        text = config.get_text_config()
        defaults = type(text)()
        declared = corept_store.arch(config_name).config_attrs()
        batch = corept_store.batch(config_name)
        ref = C.eval_logits(corept_store.base(config_name), batch)
        undeclared = []
        for name, value in scalar_fields(config).items():
            default = getattr(defaults, name, None)
            if name in declared or value == default:
                continue
            changed = corept_store.config(config_name)
            setattr(changed.get_text_config(), name, default)
            model = B.build_base(changed, self.model_classes.get(config_name), self.seed)
            if scaled_error(C.eval_logits(model, batch), ref) > 1e-6:
                undeclared.append(f"{name}={value!r} (default {default!r})")
        assert not undeclared, (
            f"{config_name}: config field(s) {undeclared} change the model's outputs but the architecture does "
            f"not declare them: read each with FromConfig in Numerics (if corept's components must apply it) or "
            f"list it in Recorded(config={{name: how transformers applies it}})")

    def test_signatures_are_faithful(self, corept_store, config_name):
        """Every forward corept installs (components, then LoRA) has the signature of the one it replaced."""
        base = corept_store.base(config_name)
        model = corept.patch(copy.deepcopy(base))
        assert live.check_signatures(model) > 0, "patching installed no forward"
        arch = corept_store.arch(config_name)
        peft_model = B.add_lora(model, patched=True, targets=B.lora_targets(base, arch), rank=self.lora_rank,
                                checkpointing=False)
        live.check_signatures(peft_model)

    def test_report_is_live(self, corept_store, config_name, tmp_path):
        """Every statement of ``corept.report`` holds in the module tree: after patching, ``train()``,
        ``eval()``, ``get_peft_model``, saving, and in a model reloaded with ``corept.load``."""
        base = corept_store.base(config_name)
        model = corept.patch(copy.deepcopy(base))
        for step in (lambda m: m, lambda m: m.train(), lambda m: m.eval()):
            step(model)
            live.check_report(model)
        arch = corept_store.arch(config_name)
        peft_model = B.add_lora(model, patched=True, targets=B.lora_targets(base, arch), rank=self.lora_rank,
                                checkpointing=True)
        for step in (lambda m: m, lambda m: m.train(), lambda m: m.eval()):
            step(peft_model)
            live.check_report(peft_model)
        assert "lora" in corept.report(peft_model).applied or "lora" in corept.report(peft_model).fallbacks
        if self.model_classes.get(config_name):
            return  # corept.load builds AutoModelForCausalLM; this config names another class
        corept.save(peft_model, None, tmp_path / "merged", method="merged_16bit")
        live.check_report(peft_model)
        reloaded, _ = corept.load(str(tmp_path / "merged"), dtype="fp32")
        live.check_report(reloaded.train())
        live.check_report(reloaded.eval())
