"""corept.architecture (declarations as frozen data) and corept.versions (declared ranges)."""
from __future__ import annotations

import dataclasses
import json
import math

import importlib_metadata
import pytest

from corept import Architecture, FromConfig, ModuleRoles, Quirks
from corept.plugins import get_plugin_manager
from corept.versions import in_range, transformers_supported
import tiny


def test_quirks_are_frozen_and_validated():
    q = Quirks()
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.norm_offset = 1.0
    with pytest.raises(ValueError, match="norm_casting"):
        Quirks(norm_casting="float32")
    with pytest.raises(ValueError, match="mlp_activation"):
        Quirks(mlp_activation="relu")


@pytest.mark.parametrize("quirks,forced", [
    (Quirks(), None),
    (Quirks(disable_sdpa=True), "eager"),
    (Quirks(attn_implementation="flex_attention"), "flex_attention"),
    (Quirks(disable_sdpa=True, attn_implementation="flex_attention"), "flex_attention"),
])
def test_forced_attention_implementation(quirks, forced):
    assert quirks.forced_attn_implementation == forced


def test_quirks_resolve_against_a_config():
    config = tiny.tiny_config("gemma2")
    q = Quirks(attn_softcap=FromConfig("attn_logit_softcapping"), sliding_window=FromConfig("sliding_window"),
               attention_bias=FromConfig("no_such_attr", default=True), embedding_scale="sqrt_hidden")
    r = q.resolve(config)
    assert (r.attn_softcap, r.sliding_window, r.attention_bias) == (50.0, 4, True)
    assert r.embedding_scale == math.sqrt(tiny.HIDDEN)
    assert isinstance(q.attn_softcap, FromConfig)  # the declaration itself is untouched
    d = q.to_dict()
    assert d["attn_softcap"] == "config.attn_logit_softcapping" and d["embedding_scale"] == "sqrt_hidden"
    json.dumps(d)
    json.dumps(r.to_dict())


def test_module_roles():
    roles = ModuleRoles.standard("Qwen3", mlp=())
    assert roles.attention == ("Qwen3Attention",) and roles.norm == ("Qwen3RMSNorm",)
    assert roles.causal_lm == ("Qwen3ForCausalLM",) and roles.mlp == ()
    assert roles.role_of("Qwen3RotaryEmbedding") == "rotary"
    assert roles.role_of("Qwen3DecoderLayer") == "decoder_layer"
    assert roles.role_of("Qwen3MLP") is None and roles.role_of("LlamaMLP") is None


def test_architecture_validation_and_json():
    with pytest.raises(ValueError, match="unknown components"):
        Architecture("x", ModuleRoles(), components=("norm", "attn"))
    arch = Architecture("x", ModuleRoles.standard("X"), aliases=(("x-1b", "acme/X-1B"),),
                        quirks=Quirks(final_logit_softcap=FromConfig("final_logit_softcapping")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.priority = 3
    d = json.loads(json.dumps(arch.to_dict()))
    assert d["aliases"] == {"x-1b": "acme/X-1B"} and d["quirks"]["final_logit_softcap"] == "config.final_logit_softcapping"
    assert d["components"] == ["attention", "mlp", "rope", "norm", "loss"]


def test_declared_roles_exist_in_transformers():
    """Every class a built-in plugin names must exist in the installed transformers modeling module."""
    import importlib

    pm = get_plugin_manager()
    family = {"qwen3_moe": "qwen3_moe", "gemma3_text": "gemma3"}
    for model_type in pm.model_types():
        arch, _ = pm.architecture_for(model_type)
        mod = importlib.import_module(f"transformers.models.{family.get(model_type, model_type)}."
                                      f"modeling_{family.get(model_type, model_type)}")
        for role in ("attention", "mlp", "norm", "rotary", "decoder_layer", "causal_lm"):
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
