"""corept.patching.compile: decoder layers as torch.compile regions, per instance, with a fallback.

On CPU the layers compile with ``backend="aot_eager"`` (Dynamo and AOTAutograd trace; no code
generation), the Triton kernels run through the interpreter. A LoRA training step (corept's
offloaded checkpointing on, fused LoRA paths, fused loss) gives the loss and every adapter gradient
of the uncompiled run; the layer traces without a graph break; unpatch removes the regions; a
compiler that fails sends the model back to eager with one warning and a report line.
"""
from __future__ import annotations


import copy

import pytest
import torch

import corept
from corept.patching import compile as pc
from corept.testing.tolerances import assert_fp32_close
import tiny

AOT = {"backend": "aot_eager"}
IDS, LABELS = tiny.batch(s=11)


def _lora(model_type: str, compile_option, checkpointing="corept", model=None):
    model = tiny.tiny_model(model_type) if model is None else model
    corept.patch(model, compile=compile_option)
    peft_model = corept.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=checkpointing)
    gen = torch.Generator().manual_seed(5)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft_model


def _step(model, ids=IDS, labels=LABELS):
    model.train()
    for p in model.parameters():
        p.grad = None
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", ["llama"])  # every plugin's kit runs its own (corept.testing.suite_compile)
def test_compiled_layers_train_like_eager(model_type):
    torch._dynamo.reset()
    eager, compiled = _lora(model_type, False), _lora(model_type, AOT)
    assert corept.report(eager).settings["compile"] == "off (compile=False)"
    assert corept.report(compiled).settings["compile"].startswith("2 decoder layers, one region each (aot_eager")
    for ids, labels in ((IDS, LABELS), tiny.batch(s=7, seed=3)):  # a second length: one dynamic recompile
        want_loss, want = _step(eager, ids, labels)
        got_loss, got = _step(compiled, ids, labels)
        assert torch.allclose(got_loss, want_loss, rtol=1e-6, atol=1e-6)
        assert want.keys() == got.keys()
        for name in want:
            assert tiny.mismatch(got[name], want[name], rtol=1e-5, atol=1e-6) is None, name
    assert "fell back" not in corept.report(compiled).settings["compile"]


def test_decoder_layer_traces_without_graph_breaks():
    model = _lora("llama", AOT, checkpointing=False)
    model.train()  # the fused LoRA paths serve training calls
    layer = model.base_model.model.model.layers[0]
    hidden = torch.randn(2, 11, layer.self_attn.config.hidden_size)
    position_embeddings = model.base_model.model.model.rotary_emb(hidden, torch.arange(11)[None].expand(2, -1))
    explained = torch._dynamo.explain(layer._call_impl)(hidden, position_embeddings=position_embeddings,
                                                        attention_mask=None)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {"corept_kernels.lora_linears_fwd", "corept_kernels.lora_mlp_fwd", "corept_kernels.rms_norm_fwd",
            "corept_kernels.rope_fwd"} <= ops, sorted(ops)


def test_unpatch_removes_the_compiled_regions():
    model = tiny.tiny_model("llama")
    corept.patch(model, compile=AOT)
    layers = model.model.layers
    assert all(isinstance(layer.__dict__.get(pc.ATTR), pc.CompiledCall) for layer in layers)
    corept.unpatch(model)
    assert all(pc.ATTR not in layer.__dict__ for layer in layers)
    assert tiny.instance_overrides(model) == []


def test_switches_and_defaults(monkeypatch):
    model = tiny.tiny_model("llama")
    assert pc.choose(None, model) == (None, "off (default; compile=True or COREPT_COMPILE=1 turns it on)")
    assert pc.choose(True, model)[0] == {} and pc.choose(AOT, model)[0] == AOT
    monkeypatch.setenv(pc.ENV, "0")
    assert pc.choose(True, model) == (None, f"off ({pc.ENV}=0)")
    monkeypatch.setenv(pc.ENV, "1")
    assert pc.choose(None, model)[0] == {}
    with pytest.raises(corept.InvalidOptionsError, match="compile must be"):
        pc.choose("yes", model)


def _broken_backend(gm, example_inputs):
    raise RuntimeError("this compiler is broken on purpose")


def test_failing_compiler_falls_back_to_eager_with_one_warning(corept_warnings):
    torch._dynamo.reset()
    eager = _lora("llama", False, checkpointing=False)
    broken = _lora("llama", {"backend": _broken_backend}, checkpointing=False)
    want_loss, want = _step(eager)
    got_loss, got = _step(broken)
    assert torch.equal(got_loss, want_loss) and all(torch.equal(got[n], want[n]) for n in want)
    setting = corept.report(broken).settings["compile"]
    assert setting.startswith("fell back to eager: BackendCompilerFailed") and "broken on purpose" in setting
    warnings = [r for r in corept_warnings.records if "compiling the decoder layers failed" in r.getMessage()]
    assert len(warnings) == 1
    _step(broken)  # later steps run eagerly without trying again
    assert len([r for r in corept_warnings.records if "compiling the decoder layers failed" in r.getMessage()]) == 1


def test_errors_of_the_callers_own_propagate():
    """A bad input fails eagerly too: its error reaches the caller and compilation is not blamed."""
    model = _lora("llama", AOT, checkpointing=False)
    with pytest.raises(Exception):
        model(input_ids=IDS.float())  # float ids: the embedding refuses them
    assert "fell back" not in corept.report(model).settings["compile"]


class _HubWrapper(torch.nn.Module):
    """What transformers 5.25+ with HF ``kernels`` puts at module level in place of a function."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return self.fn(q, k, cos, sin, unsqueeze_dim)


def test_layers_of_a_modeling_module_with_hub_kernel_wrappers_compile(monkeypatch):
    """Modeling functions replaced by nn.Module wrappers at module level (transformers 5.25+ with HF
    ``kernels``): corept's cloned forwards keep globals of their own, so Dynamo guards them and the
    layers compile and train like eager."""
    import sys

    model = tiny.tiny_model("llama")
    mod = sys.modules[type(model.model.layers[0]).__module__]
    monkeypatch.setattr(mod, "apply_rotary_pos_emb", _HubWrapper(mod.apply_rotary_pos_emb))
    eager = _lora("llama", False, checkpointing=False, model=copy.deepcopy(model))
    compiled = _lora("llama", AOT, checkpointing=False, model=model)
    want, got = _step(eager), _step(compiled)
    setting = corept.report(compiled).settings["compile"]
    assert "one region each" in setting and "fell back" not in setting, setting
    assert_fp32_close("loss", got[0], want[0])


def test_layers_share_one_compiled_graph():
    """Every decoder layer of a model runs one compiled frame: corept's per-instance forwards
    (rope and attention globals, fused LoRA forwards) are shared by layers they are equal for, so
    Dynamo's guards hold across layers. Per-layer copies made each layer a recompile, and past
    ``torch._dynamo.config.recompile_limit`` (8) the remaining layers of an 8B model ran eager."""
    from torch._dynamo.utils import counters

    def graphs(layers: int) -> int:
        torch._dynamo.reset()
        counters.clear()
        _step(_lora("llama", AOT, model=tiny.tiny_model("llama", num_hidden_layers=layers)))
        return counters["stats"]["unique_graphs"]

    two, four = graphs(2), graphs(4)
    # offloaded checkpointing runs each layer without and with grad: two graphs per shape
    assert two == four == 2, f"{two} graphs for 2 layers, {four} for 4: a recompile per layer"
