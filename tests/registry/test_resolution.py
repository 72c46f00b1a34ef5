"""Resolve once, carry it: the architecture resolved when a model is patched is the one every later
step reads (LoRA setup, checkpointing, FSDP layer discovery, the report)."""
from __future__ import annotations

import corept
from corept.distributed.fsdp import layer_class_names
from corept.registry import resolution
import tiny


def test_later_steps_read_the_resolved_architecture(monkeypatch):
    model = corept.patch(tiny.tiny_model("qwen3"))
    arch = corept.architecture_of(model)
    assert isinstance(arch, corept.ResolvedArchitecture) and arch.plugin == "qwen"
    assert arch.config is model.config.get_text_config()

    def no_lookup(*args, **kwargs):
        raise AssertionError("a later step looked the architecture up again")

    monkeypatch.setattr(resolution, "resolve", no_lookup)
    monkeypatch.setattr(corept.get_plugin_manager(), "architecture_for", no_lookup)
    peft_model = corept.get_peft_model(model, r=4, use_gradient_checkpointing=True)
    assert corept.architecture_of(peft_model) is arch
    assert layer_class_names(peft_model) == {"Qwen3DecoderLayer"}
    assert corept.report(peft_model).plugin == "qwen" and "lora" in corept.report(peft_model).applied


def test_load_resolves_once(tmp_path, monkeypatch):
    folder = tiny.save_tiny(tmp_path / "m", "llama")
    calls = []
    real = resolution.resolve
    monkeypatch.setattr("corept.loading.loader.resolve", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr("corept.patching.engine.resolve", lambda *a, **k: calls.append(2) or real(*a, **k))
    model, _ = corept.load(str(folder), dtype="fp32")
    assert calls == [1] and corept.report(model).patched
