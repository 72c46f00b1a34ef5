"""Sources of the throwaway third-party plugins and the scripts that exercise them (test_manager.py).

Each plugin source becomes the ``__init__.py`` of a real distribution (:mod:`plugin_factory`); each
script runs in its own subprocess (the plugin manager is per process) and reports through ``emit``.
"""
ACME = '''
"""acme: a third-party corept plugin. Overrides the llama norm and adds an architecture."""
import torch

import corept
from corept import Architecture, ModuleRoles, Replacement

CALLS = {"norm": 0}


def counting_rms_norm(self, hidden_states):
    CALLS["norm"] += 1
    h = hidden_states.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h.to(hidden_states.dtype)


@corept.hookimpl
def corept_register_architectures():
    keep = {c: "acme leaves it to transformers" for c in ("attention", "mlp", "rope")}
    return [Architecture("phi3", ModuleRoles(norm=("Phi3RMSNorm",), causal_lm=("Phi3ForCausalLM",)),
                         transformers=">=5.0", keep=keep, notes="declared by acme")]


@corept.hookimpl(tryfirst=True)
def corept_patch_norm(arch, module, model):
    if arch.model_type != "llama":
        return None
    return Replacement(implementation="acme:counting_rms_norm", forward=counting_rms_norm)
'''

ACME_SCRIPT = '''
import copy
import torch
import corept, corept_acme, tiny

pm = corept.get_plugin_manager()
out = {"records": {n: r.to_dict() for n, r in pm.records.items()}}
ids, _ = tiny.batch()
model = tiny.tiny_model("llama")
ref = copy.deepcopy(model)
corept.patch(model)
out["llama"] = corept.report(model).to_dict()
out["n_norms"] = sum(type(m).__name__ == "LlamaRMSNorm" for m in model.modules())
before = corept_acme.CALLS["norm"]
with torch.no_grad():
    got, want = model(ids).logits, ref(ids).logits
out["calls"] = corept_acme.CALLS["norm"] - before
out["mismatch"] = tiny.mismatch(got, want)
corept.unpatch(model)
with torch.no_grad():
    out["unpatched_equal"] = torch.equal(model(ids).logits, want)
out["calls_after_unpatch"] = corept_acme.CALLS["norm"] - before
other = tiny.tiny_model("mistral")
corept.patch(other)
out["mistral_norm"] = corept.report(other).applied.get("norm")
phi = tiny.tiny_model("phi3")
phi_ref = copy.deepcopy(phi)
corept.patch(phi)
out["phi3"] = corept.report(phi).to_dict()
with torch.no_grad():
    out["phi3_mismatch"] = tiny.mismatch(phi(ids).logits, phi_ref(ids).logits)
emit(out)
'''

BROKEN = '''
raise RuntimeError("acme-broken cannot start: license file missing")
'''

BROKEN_SCRIPT = '''
import corept, tiny
from corept.cli import doctor
logs = capture_logs("corept", logging.WARNING)
pm = corept.get_plugin_manager()
model = corept.patch(tiny.tiny_model("llama"))
emit({"logs": logs, "records": {n: r.to_dict() for n, r in pm.records.items()},
      "llama": corept.report(model).to_dict(), "problems": doctor.collect()["problems"]})
'''

DUP = '''
from corept import Architecture, ArchitecturePlugin, ModuleRoles
plugin = ArchitecturePlugin([Architecture("llama", ModuleRoles.standard("Llama"))])
'''

PLUS = '''
from corept import Architecture, ArchitecturePlugin, ModuleRoles
plugin = ArchitecturePlugin([Architecture("llama", ModuleRoles.standard("Llama"), priority=1)])
'''

DUP_SCRIPT = '''
# started with COREPT_DISABLE_PLUGINS=llamaplus (a conflict); then with every plugin (a priority win)
import corept, tiny
from corept.cli import doctor
out = {}
for name in ("conflict", "priority"):
    if name == "priority":
        del os.environ["COREPT_DISABLE_PLUGINS"]
        corept.reset_plugin_manager()
    data = out[name] = {}
    try:
        model = corept.patch(tiny.tiny_model("llama"))
        data["llama"] = corept.report(model).to_dict()
    except corept.PluginConflictError as exc:
        data["conflict"] = str(exc)
    data["qwen3"] = corept.report(corept.patch(tiny.tiny_model("qwen3"))).plugin
    data["problems"] = doctor.collect()["problems"]
emit(out)
'''

OLD = '''
from corept import Architecture, ArchitecturePlugin, ModuleRoles
plugin = ArchitecturePlugin([Architecture("llama", ModuleRoles.standard("Llama"), transformers="<5.0")])
'''

OLD_SCRIPT = '''
import tempfile
import torch
from transformers import AutoModelForCausalLM
import corept, tiny
from corept.cli import inspect_cmd, plugins_cmd
logs = capture_logs("corept", logging.WARNING)
folder = tiny.save_tiny(tempfile.mkdtemp(), "llama")
model, tok = corept.load(str(folder))
ref = AutoModelForCausalLM.from_pretrained(folder).eval()
ids, labels = tiny.batch()
model.train(); ref.train()
got, want = model(ids, labels=labels), ref(ids, labels=labels)
emit({"report": corept.report(model).to_dict(), "logs": logs,
      "logits_equal": torch.equal(got.logits, want.logits), "loss_equal": torch.equal(got.loss, want.loss),
      "overrides": tiny.instance_overrides(model),
      "plugins": {r["name"]: r for r in plugins_cmd.collect()},
      "inspect": inspect_cmd.collect(str(folder))})
'''


ENV_SCRIPT = '''
# The first configuration comes from the environment this process started with; the others are
# applied with os.environ + corept.reset_plugin_manager() (documented to re-read the variables).
import corept, tiny
CONFIGS = [
    ("only_llama", {"COREPT_PLUGINS": "llama"}, ("llama", "qwen3")),
    ("only_none", {"COREPT_PLUGINS": ""}, ("llama",)),
    ("only_by_dist", {"COREPT_PLUGINS": " corept-qwen , gemma"}, ("llama", "qwen3")),
    ("no_gemma", {"COREPT_DISABLE_PLUGINS": "gemma"}, ("llama", "gemma")),
    ("trace", {"COREPT_TRACE": "1"}, ()),
]
trace = capture_logs("corept.trace", logging.DEBUG)
out = {}
for i, (name, env, patch_types) in enumerate(CONFIGS):
    if i:
        for var in ("COREPT_PLUGINS", "COREPT_DISABLE_PLUGINS", "COREPT_TRACE"):
            os.environ.pop(var, None)
        os.environ.update(env)
        corept.reset_plugin_manager()
    assert {k: os.environ.get(k) for k in env} == env
    pm = corept.get_plugin_manager()
    data = {"records": {n: r.to_dict() for n, r in pm.records.items()}, "model_types": pm.model_types()}
    for mt in patch_types:
        data[mt] = corept.report(corept.patch(tiny.tiny_model(mt))).to_dict()
    if name == "trace":
        data["applied"] = corept.report(corept.patch(tiny.tiny_model("llama"), only=["norm"])).applied
    data["trace_lines"] = list(trace)
    trace.clear()
    out[name] = data
emit(out)
'''
