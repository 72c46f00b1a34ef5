"""corept.registry.declarations and .quirks (declarations as frozen data) and corept.versions (ranges)."""
from __future__ import annotations

import dataclasses
import json

import importlib_metadata
import pytest

from corept import (Architecture, FromConfig, KnownModel, LoadPolicy, ModuleRoles, Numerics, Projections,
                    Recorded)
from corept.registry.manager import get_plugin_manager
from corept.registry.resolution import bind
from corept.versions import in_range, transformers_supported
import tiny


def test_quirk_groups_are_frozen_and_validated():
    n = Numerics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        n.norm_offset = 1.0
    with pytest.raises(ValueError, match="norm_casting"):
        Numerics(norm_casting="float32")
    with pytest.raises(ValueError, match="mlp_activation"):
        Numerics(mlp_activation="relu")
    assert Numerics(mlp_activation="gelu_pytorch_tanh").mlp_activation == "gelu_pytorch_tanh"  # an HF name is fine


@pytest.mark.parametrize("policy,forced", [
    (LoadPolicy(), None),
    (LoadPolicy(disable_sdpa=True), "eager"),
    (LoadPolicy(attn_implementation="flex_attention"), "flex_attention"),
    (LoadPolicy(disable_sdpa=True, attn_implementation="flex_attention"), "flex_attention"),
])
def test_forced_attention_implementation(policy, forced):
    assert policy.forced_attn_implementation == forced


def test_quirks_resolve_against_a_config():
    config = tiny.tiny_config("gemma2")
    r = Recorded(attn_softcap=FromConfig("attn_logit_softcapping"), sliding_window=FromConfig("sliding_window"),
                 config={"query_pre_attn_scalar": "attention scale"}).resolve(config)
    assert (r.attn_softcap, r.sliding_window) == (50.0, 4)
    n = Numerics(logit_scale=FromConfig.reciprocal("final_logit_softcapping"),
                 final_logit_softcap=FromConfig("no_such_attr", default=3.0)).resolve(config)
    assert n.logit_scale == pytest.approx(1 / 30.0) and n.final_logit_softcap == 3.0
    assert n.mlp_activation == "geglu_tanh"  # read from config.hidden_activation through the HF table
    d = Numerics(logit_scale=FromConfig.reciprocal("logits_scaling")).to_dict()
    assert d["logit_scale"] == "1 / config.logits_scaling"
    assert d["mlp_activation"] == "config.hidden_activation or config.hidden_act"
    json.dumps(d)
    json.dumps(r.to_dict())


def test_activation_from_config_passes_unknown_names_through():
    config = tiny.tiny_config("llama")
    config.hidden_act = "relu2"
    assert Numerics().resolve(config).mlp_activation == "relu2"  # the MLP component keeps HF's, with that reason


def test_config_attrs_name_what_a_declaration_reads_or_records():
    arch = Architecture("x", ModuleRoles.standard("X"),
                        numerics=Numerics(logit_scale=FromConfig.reciprocal("logits_scaling")),
                        recorded=Recorded(sliding_window=FromConfig("sliding_window"), config={"embedding_multiplier": "x"}))
    resolved = bind(arch, "p", None, tiny.tiny_config("llama"))
    assert {"logits_scaling", "sliding_window", "embedding_multiplier", "hidden_act"} <= resolved.config_attrs()


def test_module_roles_and_projections():
    roles = ModuleRoles.standard("Qwen3", mlp=())
    assert roles.attention == ("Qwen3Attention",) and roles.norm == ("Qwen3RMSNorm",)
    assert roles.causal_lm == ("Qwen3ForCausalLM",) and roles.mlp == ()
    assert roles.role_of("Qwen3DecoderLayer") == "decoder_layer"
    assert roles.role_of("Qwen3MLP") is None and roles.role_of("LlamaMLP") is None
    fused = Projections.fused()
    assert (fused.qkv, fused.gate_up, fused.q, fused.gate) == ("qkv_proj", "gate_up_proj", None, None)
    assert fused.attention == ("qkv_proj", "o_proj") and fused.mlp == ("gate_up_proj", "down_proj")
    with pytest.raises(ValueError, match="not both"):
        Projections(qkv="qkv_proj")


def test_architecture_validation_and_json():
    with pytest.raises(ValueError, match="unknown components"):
        Architecture("x", ModuleRoles(), keep={"attn": "typo"})
    with pytest.raises(ValueError, match="needs a reason"):
        Architecture("x", ModuleRoles(), keep={"loss": ""})
    arch = Architecture("x", ModuleRoles.standard("X"), models=(KnownModel("acme/X-1B", aliases=("x-1b",)),),
                        numerics=Numerics(final_logit_softcap=FromConfig("final_logit_softcapping")),
                        keep={"loss": "the head is custom"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.priority = 3
    d = json.loads(json.dumps(arch.to_dict()))
    assert d["aliases"] == {"x-1b": "acme/X-1B"}
    assert d["numerics"]["final_logit_softcap"] == "config.final_logit_softcapping"
    assert d["components"] == ["attention", "mlp", "rope", "norm"] and d["keep"] == {"loss": "the head is custom"}


def test_declared_roles_exist_in_transformers():
    """Every class a built-in plugin names must exist in the installed transformers modeling module."""
    import importlib

    pm = get_plugin_manager()
    family = {"qwen3_moe": "qwen3_moe", "gemma3_text": "gemma3"}
    for model_type in pm.model_types():
        arch, _ = pm.architecture_for(model_type)
        mod = importlib.import_module(f"transformers.models.{family.get(model_type, model_type)}."
                                      f"modeling_{family.get(model_type, model_type)}")
        for role in ("attention", "mlp", "norm", "decoder_layer", "causal_lm"):
            for cls in getattr(arch.roles, role):
                assert hasattr(mod, cls), f"{model_type}: {role} class {cls} not in {mod.__name__}"


@pytest.mark.parametrize("version,spec,ok", [
    ("5.24.0", ">=5.17,<6", True),
    ("5.17.0", ">=5.17,<6", True),
    ("5.16.2", ">=5.17,<6", False),
    ("6.0.0", ">=5.17,<6", False),
    ("2.13.0+cpu", ">=2.11", True),   # local version labels are ignored
    ("5.30.0.dev0", ">=5.17,<6", True),  # pre-releases count
])
def test_in_range(version, spec, ok):
    assert in_range(version, spec)[0] is ok
    if not ok:
        assert f"installed {version} is outside the declared range {spec!r}" == in_range(version, spec)[1]


def test_in_range_bad_inputs():
    assert in_range(None, ">=1") == (False, "not installed")
    assert in_range("1.0", "not a spec")[0] is False and "invalid version range" in in_range("1.0", "not a spec")[1]


def test_transformers_supported_uses_the_installed_version():
    installed = importlib_metadata.version("transformers")
    assert transformers_supported(f"=={installed}") == (True, "")
    ok, reason = transformers_supported("<5.0")
    assert not ok and reason == f"transformers installed {installed} is outside the declared range '<5.0'"
