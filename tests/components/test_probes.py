"""Shared components replace a forward only after reproducing it on a probe; otherwise they keep
transformers' forward and say which declared value to check.

Each case registers, in code, a declaration that claims a model type over the shipped plugin
(``priority=1``) with one quirk wrong or missing, and checks the report and the outputs.
"""
from __future__ import annotations

import copy

import pytest
import torch

import corept
from corept import Architecture, FromConfig, ModuleRoles, Numerics
from corept.registry.plugin_base import ArchitecturePlugin
from corept.testing import live
import tiny

IDS, LABELS = tiny.batch()


@pytest.fixture
def declare():
    """``declare(Architecture)``: register it for the test's duration."""
    names = []

    def register(*archs):
        name = f"probe-test-{len(names)}"
        corept.register_plugin(ArchitecturePlugin(archs), name)
        names.append(name)

    yield register
    for name in names:
        corept.unregister_plugin(name)


def _same_outputs(model, ref):
    model.train(), ref.train()
    got, want = model(IDS, labels=LABELS), ref(IDS, labels=LABELS)
    assert tiny.mismatch(got.loss, want.loss) is None
    model.eval(), ref.eval()
    with torch.no_grad():
        assert tiny.mismatch(model(IDS).logits, ref(IDS).logits) is None


def test_a_wrong_norm_offset_keeps_hf_norms_and_names_the_quirk(declare):
    declare(Architecture("llama", ModuleRoles.standard("Llama"), numerics=Numerics(norm_offset=1.0), priority=1))
    model = tiny.tiny_model("llama")
    ref = copy.deepcopy(model)
    rep = corept.report(corept.patch(model))
    assert "norm" not in rep.applied and {"mlp", "rope", "loss"} <= set(rep.applied)
    why = rep.fallbacks["norm"]
    assert why.startswith("5 modules: LlamaRMSNorm.forward is not reproduced by corept's norm"), why
    assert "check the declared norm_offset=1 and norm_casting='scale_after_cast'" in why
    _same_outputs(model, ref)
    live.check_report(model)


def test_a_wrong_activation_keeps_hf_mlps(declare):
    declare(Architecture("llama", ModuleRoles.standard("Llama"), numerics=Numerics(mlp_activation="geglu"), priority=1))
    rep = corept.report(corept.patch(tiny.tiny_model("llama")))
    assert "mlp" not in rep.applied and "mlp_activation='geglu'" in rep.fallbacks["mlp"]


def test_an_activation_without_a_kernel_is_a_reason():
    model = corept.patch(tiny.tiny_model("llama", hidden_act="relu2"))
    rep = corept.report(model)
    assert rep.fallbacks["mlp"] == "2 modules: activation 'relu2' has no corept gated kernel (kernels: swiglu, geglu_tanh, geglu)"


def test_undeclared_head_math_keeps_the_loss_declared_head_math_fuses(declare):
    """Granite divides its logits by ``config.logits_scaling``: without the declaration the shared
    loss would drop it (every tensor off at ``logits_scaling=4``); the probe refuses it instead."""
    base = tiny.tiny_model_from(tiny.tiny_config_of("granite", logits_scaling=4.0))
    declare(Architecture("granite", ModuleRoles.standard("Granite")))
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    rep = corept.report(corept.patch(model))
    assert "loss" not in rep.applied and "declare its head-side math in Numerics" in rep.fallbacks["loss"]
    _same_outputs(model, ref)
    corept.unregister_plugin("probe-test-0")
    corept.register_plugin(ArchitecturePlugin([Architecture(
        "granite", ModuleRoles.standard("Granite"),
        numerics=Numerics(logit_scale=FromConfig.reciprocal("logits_scaling")))]), "probe-test-0")
    model = copy.deepcopy(base)
    rep = corept.report(corept.patch(model))
    assert rep.applied["loss"] == "triton:fused_linear_cross_entropy x1" and rep.quirks["logit_scale"] == 0.25
    model.train()
    assert model(IDS, labels=LABELS).logits is None  # the fused path ran
    _same_outputs(model, ref)


def test_another_rotary_convention_keeps_its_own(declare):
    """Cohere rotates interleaved pairs: its apply_rotary_pos_emb is not corept's rotate-half kernel."""
    declare(Architecture("cohere", ModuleRoles.standard("Cohere", norm=("CohereLayerNorm",)),
                         numerics=Numerics(logit_scale=FromConfig("logit_scale"))))
    model = tiny.tiny_model_from(tiny.tiny_config_of("cohere", logit_scale=0.5))
    ref = copy.deepcopy(model)
    rep = corept.report(corept.patch(model))
    assert "rope" not in rep.applied and "not the rotate-half rotation" in rep.fallbacks["rope"]
    assert "norm" not in rep.applied and "is not reproduced by corept's norm" in rep.fallbacks["norm"]  # a LayerNorm
    assert rep.applied["loss"] == "triton:fused_linear_cross_entropy x1"  # logits * logit_scale, declared
    _same_outputs(model, ref)


def test_probing_leaves_the_global_rng_alone():
    model = tiny.tiny_model("gemma2")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    corept.patch(model)
    assert torch.equal(torch.get_rng_state(), before)


def test_meta_tensors_cannot_be_proven():
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = tiny.tiny_model_from(tiny.tiny_config("llama"))
    rep = corept.report(corept.patch(model))
    assert rep.applied == {}
    assert "cannot prove the norm replacement on meta tensors" in rep.fallbacks["norm"]
