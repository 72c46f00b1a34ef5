"""corept.registry.manager: built-in and entry-point plugins, env vars, broken/misspelled/duplicate/
out-of-range plugins.

corept's own built-in plugin (``corept.components``, the shared components) loads through the same
code as the five shipped architecture plugins, which are real installed distributions (``make install``). Third-party plugins
are real distributions too: written into tmp_path by :mod:`plugin_factory`, pip-installed into a
temporary site folder and exercised in subprocesses (the plugin manager is per process, and
entry points and env vars are read at its first use).
"""
from __future__ import annotations

import importlib.util

import importlib_metadata
import pytest

import corept
from corept.registry.manager import ENTRY_POINT_GROUP, get_plugin_manager
from plugin_factory import make_plugin, ok, run_scripts
from third_party_sources import (ACME, ACME_SCRIPT, BROKEN, BROKEN_SCRIPT, DUP, DUP_SCRIPT, ENV_SCRIPT, OLD,
                                 OLD_SCRIPT, PLUS)
import tiny

BUILTIN = {"llama": "corept-llama", "mistral": "corept-mistral", "qwen": "corept-qwen", "gemma": "corept-gemma",
           "gpt_oss": "corept-gpt-oss"}
MISTRAL_TYPES = ["mistral"] + (["ministral"] if importlib.util.find_spec("transformers.models.ministral") else [])
MODEL_TYPES = {"llama": ["llama"], "mistral": MISTRAL_TYPES, "qwen": ["qwen2", "qwen3", "qwen3_moe"],
               "gemma": ["gemma", "gemma2", "gemma3_text", "gemma3"], "gpt_oss": ["gpt_oss"]}


# -- in process: the installed built-ins ---------------------------------------------------------
def test_builtin_plugins_are_found_through_installed_entry_points():
    eps = {ep.name: ep for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)}
    for name, dist in BUILTIN.items():
        assert name in eps, f"entry point {name!r} not installed (run `make install`)"
        assert eps[name].dist.name == dist
    pm = get_plugin_manager()
    for name, dist in BUILTIN.items():
        rec = pm.records[name]
        assert rec.loaded and rec.error is None and not rec.builtin, rec
        assert rec.distribution == dist
        assert rec.version == importlib_metadata.version(dist)
        assert [a.model_type for a in rec.architectures] == MODEL_TYPES[name]
        assert rec.hooks == ["corept_register_architectures"]  # declarations only
    assert sorted(pm.model_types()) == sorted(t for ts in MODEL_TYPES.values() for t in ts)


def test_components_plugin_loads_like_any_plugin():
    """corept's shared components are a plugin record of their own, loaded first, answering every
    component hook and the LoRA hook (``trylast``)."""
    pm = get_plugin_manager()
    rec = pm.records["corept.components"]
    assert list(pm.records)[0] == "corept.components"
    assert rec.loaded and rec.builtin and rec.distribution == "corept" and rec.architectures == []
    assert rec.hooks == sorted(["corept_patch_attention", "corept_patch_mlp", "corept_patch_rope", "corept_patch_norm",
                                "corept_patch_loss", "corept_patch_lora", "corept_patch_experts"])
    for hook in rec.hooks:
        impls = getattr(pm.pm.hook, hook).get_hookimpls()
        assert [i.plugin_name for i in impls if i.trylast] == ["corept.components"], hook


def test_manager_is_lazy_singleton_and_idempotent():
    pm = get_plugin_manager()
    claims_before = {mt: len(c) for mt, c in pm._claims.items()}
    assert get_plugin_manager() is pm
    pm.ensure_loaded()
    assert {mt: len(c) for mt, c in pm._claims.items()} == claims_before
    assert all(n == 1 for n in claims_before.values())


def test_architecture_for_and_aliases():
    pm = get_plugin_manager()
    for mt, plugin in tiny.PLUGIN_OF.items():
        arch, rec = pm.architecture_for(mt)
        assert (arch.model_type, rec.name) == (mt, plugin)
    assert pm.architecture_for("gpt2") is None
    assert pm.alias_target("QWEN3-8B")[0] == "Qwen/Qwen3-8B"
    assert pm.alias_target("qwen3-8b")[1].name == "qwen"
    assert pm.alias_target("no-such-alias") is None


class _CodePlugin:
    """A plugin object registered in code: declares one new model_type."""

    @corept.hookimpl
    def corept_register_architectures(self):
        return [corept.Architecture("codearch", corept.ModuleRoles.standard("CodeArch"))]


def test_register_and_unregister_plugin_in_code():
    rec = corept.register_plugin(_CodePlugin(), "codeplugin")
    try:
        assert rec.loaded and rec.distribution is None
        assert get_plugin_manager().architecture_for("codearch")[1] is rec
        with pytest.raises(corept.PluginLoadError, match="codeplugin"):
            corept.register_plugin(_CodePlugin(), "codeplugin")
    finally:
        corept.unregister_plugin("codeplugin")
    assert get_plugin_manager().architecture_for("codearch") is None
    assert "codeplugin" not in get_plugin_manager().records
    assert "codearch" not in get_plugin_manager().model_types()


def test_registration_must_return_architectures():
    class Bad:
        @corept.hookimpl
        def corept_register_architectures(self):
            return ["llama"]

    with pytest.raises(corept.PluginLoadError, match="Architecture objects"):
        corept.register_plugin(Bad(), "badreturn")
    assert not get_plugin_manager().records["badreturn"].loaded
    corept.unregister_plugin("badreturn")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Install every throwaway plugin, then run every scenario's subprocess at once."""
    tmp = tmp_path_factory.mktemp("third-party")
    acme = make_plugin(tmp, "acme", ACME, version="0.3.0")
    broken = make_plugin(tmp, "broken", BROKEN)
    old = make_plugin(tmp, "oldllama", OLD, attr="plugin")
    dup = make_plugin(tmp, "dupllama", DUP, attr="plugin")
    plus = make_plugin(tmp, "llamaplus", PLUS, attr="plugin")
    jobs = {
        "acme": dict(code=ACME_SCRIPT, site=[acme]),
        "broken": dict(code=BROKEN_SCRIPT, site=[broken]),
        "old": dict(code=OLD_SCRIPT, site=[old], env={"COREPT_DISABLE_PLUGINS": "llama"}),
        "dup": dict(code=DUP_SCRIPT, site=[dup, plus], env={"COREPT_DISABLE_PLUGINS": "llamaplus"}),
        "env": dict(code=ENV_SCRIPT, env={"COREPT_PLUGINS": "llama"}),
    }
    return dict(zip(jobs, run_scripts(list(jobs.values()))))


def test_third_party_plugin_is_discovered(runs):
    recs = ok(runs["acme"])["records"]
    acme = recs["acme"]
    assert acme["loaded"] and acme["error"] is None
    assert (acme["distribution"], acme["version"]) == ("corept-acme", "0.3.0")
    assert acme["model_types"] == ["phi3"]
    assert acme["hooks"] == ["corept_patch_norm", "corept_register_architectures"]
    assert all(recs[n]["loaded"] for n in BUILTIN), recs  # the shipped plugins are unaffected
    assert recs["corept.components"]["loaded"] and recs["corept.components"]["builtin"]


def test_third_party_tryfirst_overrides_builtin_norm(runs):
    data = ok(runs["acme"])
    llama = data["llama"]
    assert llama["plugin"] == "llama"  # the architecture is still llama's ...
    assert llama["applied"]["norm"] == f"acme:counting_rms_norm x{data['n_norms']}"  # ... the norm is acme's
    assert llama["applied"]["mlp"].startswith("triton:") and llama["applied"]["loss"].startswith("triton:")
    assert data["calls"] == data["n_norms"] == 5  # its forward really ran, once per norm module
    assert data["mismatch"] is None, data["mismatch"]
    assert data["unpatched_equal"] and data["calls_after_unpatch"] == data["calls"]
    assert data["mistral_norm"] == "triton:rms_norm x5"  # the override is scoped to what it answers


def test_third_party_can_add_an_architecture(runs):
    data = ok(runs["acme"])
    phi = data["phi3"]
    assert (phi["plugin"], phi["distribution"], phi["model_type"]) == ("acme", "corept-acme", "phi3")
    # a declaration-only architecture gets corept's shared kernel-backed components
    assert set(phi["applied"]) == {"norm", "loss"} and phi["applied"]["norm"].startswith("triton:rms_norm")
    assert phi["fallbacks"]["mlp"] == "plugin 'acme' keeps it: acme leaves it to transformers"
    assert data["phi3_mismatch"] is None, data["phi3_mismatch"]


def test_broken_plugin_import_is_reported_and_others_keep_working(runs):
    data = ok(runs["broken"])
    warning = [line for line in data["logs"] if "broken" in line]
    assert len(warning) == 1, data["logs"]
    assert warning[0].startswith("WARNING corept:")
    assert "corept-broken" in warning[0] and "RuntimeError" in warning[0] and "license file missing" in warning[0]
    assert "COREPT_DISABLE_PLUGINS=broken" in warning[0]
    rec = data["records"]["broken"]
    assert not rec["loaded"] and "license file missing" in rec["error"]
    assert all(data["records"][n]["loaded"] for n in BUILTIN)
    assert data["llama"]["plugin"] == "llama" and {"norm", "mlp", "rope", "loss"} <= set(data["llama"]["applied"])
    assert any("corept-broken" in p and "license file missing" in p for p in data["problems"]), data["problems"]


def test_duplicate_claim_with_equal_priority_is_a_clear_error(runs):
    data = ok(runs["dup"])["conflict"]
    msg = data.get("conflict")
    assert msg, f"no PluginConflictError: {data}"
    assert "'llama'" in msg and "corept-llama" in msg and "corept-dupllama" in msg
    assert "COREPT_DISABLE_PLUGINS=" in msg and "priority" in msg
    assert data["qwen3"] == "qwen"  # other model types are not affected
    assert msg in data["problems"]  # and `corept doctor` reports it


def test_higher_priority_claim_wins(runs):
    data = ok(runs["dup"])["priority"]
    assert "conflict" not in data, data
    llama = data["llama"]
    assert (llama["plugin"], llama["distribution"]) == ("llamaplus", "corept-llamaplus")
    assert {"norm", "mlp", "rope", "loss"} <= set(llama["applied"])
    assert data["problems"] == []


def test_out_of_range_transformers_loads_unpatched(runs):
    data = ok(runs["old"])
    report = data["report"]
    assert report["plugin"] == "oldllama" and report["applied"] == {}
    for comp in ("norm", "mlp", "rope", "loss", "attention"):
        assert "outside the declared range '<5.0'" in report["fallbacks"][comp], report["fallbacks"]
    assert any("oldllama" in line and "<5.0" in line and "unpatched" in line for line in data["logs"]), data["logs"]
    assert data["logits_equal"] and data["loss_equal"]
    # load's own attributes and the recorded (empty) patch state on the model; no module touched
    assert data["overrides"] == ["<root>: ['corept_load_options', '_corept_patch_state']"]
    assert data["plugins"]["oldllama"]["transformers_supported"] == {"llama": False}
    assert all(v.startswith("transformers (transformers installed") for v in data["inspect"]["components"].values())


def test_env_only_llama(runs):
    data = ok(runs["env"])["only_llama"]
    recs = data["records"]
    assert recs["llama"]["loaded"]
    for name in ("mistral", "qwen", "gemma"):
        assert not recs[name]["loaded"] and recs[name]["error"] == "not listed in COREPT_PLUGINS"
    assert recs["corept.components"]["loaded"]  # the allow-list names entry-point plugins only
    assert data["model_types"] == ["llama"]
    assert data["llama"]["plugin"] == "llama" and data["llama"]["applied"]
    assert data["qwen3"]["plugin"] is None and data["qwen3"]["applied"] == {}


def test_env_empty_plugin_list_loads_none(runs):
    data = ok(runs["env"])["only_none"]
    assert set(data["records"]) == set(BUILTIN) | {"corept.components"}
    assert not any(r["loaded"] for n, r in data["records"].items() if n in BUILTIN)
    assert data["model_types"] == []
    assert data["llama"]["plugin"] is None and data["llama"]["applied"] == {}


def test_env_plugin_list_accepts_distribution_names(runs):
    data = ok(runs["env"])["only_by_dist"]
    loaded = {n for n, r in data["records"].items() if r["loaded"] and not r["builtin"]}
    assert loaded == {"qwen", "gemma"}
    assert data["qwen3"]["plugin"] == "qwen" and data["llama"]["plugin"] is None


def test_env_disable_gemma(runs):
    data = ok(runs["env"])["no_gemma"]
    recs = data["records"]
    assert not recs["gemma"]["loaded"] and recs["gemma"]["error"] == "disabled by COREPT_DISABLE_PLUGINS"
    assert all(recs[n]["loaded"] for n in ("llama", "mistral", "qwen"))
    assert data["llama"]["plugin"] == "llama"
    assert data["gemma"]["plugin"] is None and data["gemma"]["applied"] == {}


def test_env_trace_logs_hook_calls(runs):
    env = ok(runs["env"])
    data = env["trace"]
    assert data["applied"] == {"norm": "triton:rms_norm x5"}
    calls = [line for line in data["trace_lines"] if "hook corept_patch_norm(" in line]
    assert len(calls) == 5, data["trace_lines"]
    assert all(line.startswith("INFO corept.trace:") for line in calls)
    assert any("hook corept_patch_norm returned Replacement" in line for line in data["trace_lines"])
    # without COREPT_TRACE nothing is traced, although the other configurations patched models
    assert all(env[name]["trace_lines"] == [] for name in ("only_llama", "no_gemma"))
