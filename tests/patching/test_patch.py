"""corept.patching: patch/unpatch one instance, idempotence, scoping, reports, unknown architectures."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama

import corept
from corept.patching.state import STATE_ATTR
import tiny

IDS, LABELS = tiny.batch()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def llama_pair():
    """A tiny llama and a never-patched deepcopy of it (the HF reference)."""
    model = tiny.tiny_model("llama")
    return model, copy.deepcopy(model)


def test_unpatch_restores_bitwise_identical_outputs(llama_pair):
    model, ref = llama_pair
    model = copy.deepcopy(model)
    want = _logits(ref)
    corept.patch(model)
    assert corept.is_patched(model)
    patched = [n for n in tiny.instance_overrides(model) if not n.startswith("<root>")]
    assert patched, "patch changed no module"
    got = _logits(model)
    assert tiny.mismatch(got, want) is None
    corept.unpatch(model)
    assert not corept.is_patched(model)
    assert tiny.instance_overrides(model) == []  # no instance forward, no corept attribute anywhere
    assert torch.equal(_logits(model), want)
    model.train()
    ref.train()
    try:
        out, ref_out = model(IDS, labels=LABELS), ref(IDS, labels=LABELS)
        assert torch.equal(out.logits, ref_out.logits) and torch.equal(out.loss, ref_out.loss)
    finally:
        ref.eval()
    assert corept.report(model).fallbacks == {"*": "not patched"}


def test_deepcopy_of_a_patched_model(llama_pair):
    """A deep copy (how TRL builds reference models) is patched on its own modules and unpatches."""
    base, ref = llama_pair
    model = corept.patch(copy.deepcopy(base))
    clone = copy.deepcopy(model)
    assert corept.is_patched(clone) and corept.report(clone).applied == corept.report(model).applied
    for name, m in clone.named_modules():
        if "forward" in m.__dict__:
            assert m.__dict__["forward"].__self__ is m, f"{name}: forward bound to another instance"
    corept.unpatch(clone)
    assert tiny.instance_overrides(clone) == []
    assert torch.equal(_logits(clone), _logits(ref))
    assert corept.is_patched(model) and "forward" in model.model.norm.__dict__  # the original is untouched


def test_patch_leaves_parameters_and_state_dict_untouched(llama_pair):
    model = copy.deepcopy(llama_pair[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]
    corept.patch(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [id(p) for p in model.parameters()] == params_before


def test_patching_twice_is_a_noop(llama_pair, corept_warnings):
    model = copy.deepcopy(llama_pair[0])
    corept.patch(model)
    first = corept.report(model)
    forwards = {name: m.__dict__["forward"] for name, m in model.named_modules() if "forward" in m.__dict__}
    want = _logits(model)
    assert corept.patch(model) is model
    assert corept.report(model) == first
    again = {name: m.__dict__["forward"] for name, m in model.named_modules() if "forward" in m.__dict__}
    assert again.keys() == forwards.keys() and all(again[k] is forwards[k] for k in forwards)  # no double wrap
    assert torch.equal(_logits(model), want)
    assert not [r for r in corept_warnings.records if r.name.startswith("corept")]
    corept.patch(model, only=["norm"])  # a different selection is refused, with a warning
    assert corept.report(model) == first
    assert "already patched with a different selection" in corept_warnings.text


def test_patch_is_scoped_to_the_instance(llama_pair):
    class_forwards = {cls: cls.__dict__["forward"] for cls in (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP,
                                                               modeling_llama.LlamaAttention,
                                                               modeling_llama.LlamaForCausalLM)}
    rope_global = modeling_llama.apply_rotary_pos_emb
    functional = (torch.nn.functional.silu, torch.nn.functional.cross_entropy, torch.nn.functional.linear)
    model = corept.patch(copy.deepcopy(llama_pair[0]))
    assert {cls: cls.__dict__["forward"] for cls in class_forwards} == class_forwards
    assert modeling_llama.apply_rotary_pos_emb is rope_global
    assert (torch.nn.functional.silu, torch.nn.functional.cross_entropy, torch.nn.functional.linear) == functional
    fresh = tiny.tiny_model("llama")
    assert tiny.instance_overrides(fresh) == []
    # the RoPE swap is a private copy of the forward's globals, not the module's
    attn = model.model.layers[0].self_attn
    fn = attn.__dict__["forward"].__func__
    assert fn.__globals__["apply_rotary_pos_emb"] is not rope_global
    assert fn.__globals__ is not vars(modeling_llama)
    corept.unpatch(model)


def test_two_models_patched_differently(llama_pair):
    base, ref = llama_pair
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    corept.patch(a, only=["norm"])
    corept.patch(b, exclude=["norm"])
    ra, rb = corept.report(a), corept.report(b)
    assert set(ra.applied) == {"norm"}
    assert set(rb.applied) == {"mlp", "rope", "loss", "attention"}
    assert ra.fallbacks["mlp"].startswith("not selected") and rb.fallbacks["norm"].startswith("not selected")
    assert "forward" not in a.model.layers[0].mlp.__dict__ and "forward" in b.model.layers[0].mlp.__dict__
    assert "forward" in a.model.norm.__dict__ and "forward" not in b.model.norm.__dict__
    want = _logits(ref)
    assert tiny.mismatch(_logits(a), want) is None
    assert tiny.mismatch(_logits(b), want) is None
    for m in (a, b, ref):
        m.train()
    try:
        want_loss = ref(IDS, labels=LABELS).loss
        assert tiny.mismatch(a(IDS, labels=LABELS).loss, want_loss) is None
        out_b = b(IDS, labels=LABELS)
        assert out_b.logits is None  # b's loss is the fused kernel's
        assert tiny.mismatch(out_b.loss, want_loss) is None
    finally:
        ref.eval()


def test_generation_matches_hf(llama_pair):
    """Eval without labels (the un-fused head, logits_to_keep) and the KV-cache path through RoPE."""
    base, ref = llama_pair
    model = corept.patch(copy.deepcopy(base))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        got, want = model.generate(IDS, **kw), ref.generate(IDS, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for step_got, step_want in zip(got.scores, want.scores, strict=True):
        assert tiny.mismatch(step_got, step_want) is None


@pytest.mark.parametrize("kwargs", [dict(only=["bogus"]), dict(exclude=["norm", "nope"]), dict(only=["Norm"])])
def test_unknown_component_names_are_rejected(llama_pair, kwargs):
    model = copy.deepcopy(llama_pair[0])
    with pytest.raises(corept.InvalidOptionsError, match="unknown components"):
        corept.patch(model, **kwargs)
    assert not corept.is_patched(model) and tiny.instance_overrides(model) == []


def test_patch_needs_a_config():
    with pytest.raises(corept.InvalidOptionsError, match="config"):
        corept.patch(torch.nn.Linear(2, 2))


def test_report_contents_and_json(llama_pair):
    model = corept.patch(copy.deepcopy(llama_pair[0]))
    r = corept.report(model)
    assert (r.plugin, r.distribution, r.model_type) == ("llama", "corept-llama", "llama")
    assert r.applied == {"mlp": "triton:swiglu x2", "rope": "triton:rope x2", "norm": "triton:rms_norm x5",
                         "loss": "triton:fused_linear_cross_entropy x1", "attention": "triton:varlen_attention x2"}
    assert not r.fallbacks
    assert r.patched
    assert r.quirks["norm_casting"] == "scale_after_cast" and r.quirks["mlp_activation"] == "swiglu"
    d = json.loads(json.dumps(r.to_dict()))
    assert d["applied"] == r.applied and d["plugin"] == "llama"


def test_unknown_architecture_warns_and_stays_unpatched(corept_warnings):
    model = tiny.tiny_model("gpt2")
    ref = copy.deepcopy(model)
    corept.patch(model)
    warning = corept_warnings.text
    assert "no corept plugin supports model_type 'gpt2'" in warning and "stays unpatched" in warning
    r = corept.report(model)
    assert r.plugin is None and r.applied == {} and not r.patched
    assert [n for n in tiny.instance_overrides(model) if not n.startswith("<root>")] == []
    assert torch.equal(_logits(model), _logits(ref))


def test_unknown_architecture_strict_raises():
    model = tiny.tiny_model("gpt2")
    with pytest.raises(corept.UnsupportedArchitectureError) as info:
        corept.patch(model, strict=True)
    msg = str(info.value)
    assert "'gpt2'" in msg and "pip install corept-" in msg
    for name, types in (("llama", "llama"), ("qwen", "qwen2"), ("gemma", "gemma"), ("mistral", "mistral")):
        assert f"{name} (" in msg and types in msg
    assert STATE_ATTR not in model.__dict__


class _Recorder:
    """Answers every component hook first with None, recording what it was asked."""

    def __init__(self):
        self.calls = []

    def _record(self, hook, arch, module, model):
        self.calls.append((hook, arch, type(module).__name__, model))

    @corept.hookimpl(tryfirst=True)
    def corept_patch_attention(self, arch, module, model):
        self._record("attention", arch, module, model)

    @corept.hookimpl(tryfirst=True)
    def corept_patch_mlp(self, arch, module, model):
        self._record("mlp", arch, module, model)

    @corept.hookimpl(tryfirst=True)
    def corept_patch_rope(self, arch, module, model):
        self._record("rope", arch, module, model)

    @corept.hookimpl(tryfirst=True)
    def corept_patch_norm(self, arch, module, model):
        self._record("norm", arch, module, model)

    @corept.hookimpl(tryfirst=True)
    def corept_patch_loss(self, arch, module, model):
        self._record("loss", arch, module, model)


def test_each_component_hook_is_called_once_per_module_with_its_arguments():
    rec = _Recorder()
    corept.register_plugin(rec, "recorder")
    try:
        model = corept.patch(tiny.tiny_model("qwen3"))
    finally:
        corept.unregister_plugin("recorder")
    seen = {}
    arch = corept.architecture_of(model)
    for hook, asked_arch, cls, m in rec.calls:
        assert asked_arch is arch and m is model  # resolved once, the same object for every hook
        seen.setdefault(hook, []).append(cls)
    assert isinstance(arch, corept.ResolvedArchitecture) and arch.model_type == "qwen3"
    assert seen == {"attention": ["Qwen3Attention"] * 2, "mlp": ["Qwen3MLP"] * 2, "rope": ["Qwen3Attention"] * 2,
                    "norm": ["Qwen3RMSNorm"] * 9, "loss": ["Qwen3ForCausalLM"]}
    # returning None let the next implementation (the qwen plugin's) answer
    assert set(corept.report(model).applied) == {"mlp", "rope", "norm", "loss", "attention"}


class _AttentionTagger:
    """A firstresult answer for attention that only sets instance attributes."""

    @corept.hookimpl
    def corept_patch_attention(self, arch, module, model):
        return corept.Replacement(implementation="tagger:attention",
                                  attributes={"tagger_layer": module.layer_idx,
                                              "tagger_softcap": arch.recorded.attn_softcap})


class _MlpKeeper:
    """Claims the MLP first and keeps transformers' forward: an explicit Keep ends the search."""

    @corept.hookimpl(tryfirst=True)
    def corept_patch_mlp(self, arch, module, model):
        return corept.Keep("keeper keeps HF's MLP")


def test_replacement_attributes_are_recorded_and_undone():
    corept.register_plugin(_AttentionTagger(), "tagger")
    corept.register_plugin(_MlpKeeper(), "keeper")
    try:
        model = tiny.tiny_model("gemma2")
        ref = copy.deepcopy(model)
        corept.patch(model)
    finally:
        corept.unregister_plugin("tagger")
        corept.unregister_plugin("keeper")
    r = corept.report(model)
    assert r.applied["attention"] == "tagger:attention x2"
    assert "mlp" not in r.applied and r.fallbacks["mlp"] == "2 modules: keeper keeps HF's MLP"
    layers = model.model.layers
    assert [layer.self_attn.tagger_layer for layer in layers] == [0, 1]
    assert layers[0].self_attn.tagger_softcap == model.config.attn_logit_softcapping == 50.0
    assert "forward" not in layers[0].mlp.__dict__
    assert tiny.mismatch(_logits(model), _logits(ref)) is None
    corept.unpatch(model)
    assert all("tagger_layer" not in layer.self_attn.__dict__ for layer in layers)
    assert tiny.instance_overrides(model) == []
    assert torch.equal(_logits(model), _logits(ref))
