"""The experts component (``corept_patch_experts``): stacked MoE experts on grouped GEMMs, and LoRA on
them through peft's ``target_parameters``, against transformers' and peft's own forwards (fp32,
whole tensors): qwen3_moe (``[E, out, in]``, SwiGLU) and gpt_oss (``[E, in, out]``, biases, its
clamped interleaved gate)."""
import copy

import pytest
import torch

import corept
from corept import tiny
from corept.components.experts import layout_reason
from corept.saving.merge import merged_state_dict

CONFIGS = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, swiglu_limit=0.4),
}
IDS = torch.randint(0, tiny.TINY_SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))


def _model(model_type):
    model = tiny.tiny_model(model_type, **CONFIGS[model_type])
    with torch.no_grad():  # transformers initialises biases to zero: give them values
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * (want.abs().max().item() or 1.0),
                               msg=lambda m: f"{what}: {m}")


def _train_step_matches(model, ref) -> list[str]:
    """One training step's loss and every trainable gradient, model vs ref; the names compared."""
    model.train()
    ref.train()
    out, want = model(IDS, labels=IDS), ref(IDS, labels=IDS)
    _close(out.loss, want.loss, "loss")
    out.loss.backward()
    want.loss.backward()
    grads = dict(model.named_parameters())
    compared = [name for name, p in ref.named_parameters() if p.requires_grad]
    for name in compared:
        _close(grads[name].grad, dict(ref.named_parameters())[name].grad, name)
    return compared


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_experts_train_like_transformers(model_type):
    """Full fine-tuning: logits, loss and every gradient (experts, their biases, the router) match."""
    model = _model(model_type)
    ref = copy.deepcopy(model)
    corept.patch(model)
    assert corept.report(model).applied["experts"] == "triton:expert_linear x2"
    compared = _train_step_matches(model, ref)
    assert any("router" in n or "gate.weight" in n for n in compared)


def _peft_pair(model_type):
    from peft import LoraConfig, get_peft_model

    base = _model(model_type)
    ref_base = copy.deepcopy(base)
    model = corept.get_peft_model(base, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    cfg = model.peft_config["default"]
    assert sorted(cfg.target_parameters) == ["experts.down_proj", "experts.gate_up_proj"]
    ref = get_peft_model(ref_base, LoraConfig(r=4, lora_alpha=8, target_modules=sorted(cfg.target_modules),
                                              target_parameters=sorted(cfg.target_parameters)))
    with torch.no_grad():
        for (n, p), (n2, p2) in zip(model.named_parameters(), ref.named_parameters()):
            assert n == n2
            if "lora_" in n:
                v = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1
                p.copy_(v)
                p2.copy_(v)
    return model, ref


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_lora_on_experts_matches_peft(model_type):
    """LoRA on the stacked experts: corept's grouped path == peft's parametrization, in training
    (loss, every adapter gradient), with the adapter disabled, and when merged for saving."""
    model, ref = _peft_pair(model_type)
    assert "expert_linear" in corept.report(model).applied["lora"]
    compared = _train_step_matches(model, ref)
    assert sum("experts" in n for n in compared) == 8  # A and B of gate_up and down, 2 layers
    model.eval()
    ref.eval()
    with torch.no_grad(), model.disable_adapter(), ref.disable_adapter():
        _close(model(IDS).logits, ref(IDS).logits, "adapter disabled")
    merged = merged_state_dict(model, torch.float32)
    want_sd = copy.deepcopy(ref).merge_and_unload().state_dict()
    assert set(merged) == set(want_sd)
    for key, value in want_sd.items():
        _close(merged[key], value.float(), key)


def test_a_plugin_answer_comes_before_the_shared_one():
    class Keeper:
        @corept.hookimpl(tryfirst=True)
        def corept_patch_experts(self, arch, module, model):
            return corept.Keep("acme keeps its experts")

    corept.register_plugin(Keeper(), "experts-keeper")
    try:
        model = corept.patch(_model("qwen3_moe"))
    finally:
        corept.unregister_plugin("experts-keeper")
    rep = corept.report(model)
    assert "experts" not in rep.applied and "acme keeps its experts" in rep.fallbacks["experts"]


def test_layouts_the_component_does_not_serve_say_why():
    experts = _model("qwen3_moe").model.layers[0].mlp.experts
    assert layout_reason(experts) is None
    experts.has_gate = False
    assert "no gate" in layout_reason(experts)
    experts.has_gate, experts._is_expert_parallel = True, True
    assert "expert parallelism" in layout_reason(experts)


def test_a_dense_model_reports_nothing_about_experts():
    rep = corept.report(corept.patch(tiny.tiny_model("llama")))
    assert "experts" not in rep.applied and "experts" not in rep.fallbacks


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_router_aux_loss_rides_on_the_fused_loss(model_type):
    """``output_router_logits=True``: the fused loss (no logits materialised) plus
    ``router_aux_loss_coef`` x the load-balancing loss equals transformers' loss, and every gradient
    (the routers' through the aux term included) matches."""
    model = tiny.tiny_model(model_type, output_router_logits=True, router_aux_loss_coef=0.5, **CONFIGS[model_type])
    ref = copy.deepcopy(model)
    corept.patch(model)
    assert corept.report(model).applied["loss"] == "triton:fused_linear_cross_entropy x1"
    mask = torch.ones_like(IDS)
    mask[0, :2] = 0
    model.train()
    ref.train()
    out, want = model(IDS, attention_mask=mask, labels=IDS), ref(IDS, attention_mask=mask, labels=IDS)
    assert out.logits is None and want.aux_loss > 0
    _close(out.aux_loss, want.aux_loss, "aux loss")
    _close(out.loss, want.loss, "loss")
    out.loss.backward()
    want.loss.backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        _close(grads[name].grad, p.grad, name)


@pytest.mark.parametrize("model_type,kernel", [("qwen3_moe", True), ("gpt_oss", False)])
def test_default_silu_gate_runs_the_swiglu_kernel(model_type, kernel):
    """transformers' default gate with its ACT2FN["silu"] (SiLUActivation, not an nn.SiLU) runs corept's
    SwiGLU kernel; gpt-oss's own clamped gate stays the module's."""
    from corept.components.experts import _gate

    experts = [m for m in _model(model_type).modules() if type(m).__name__.endswith("Experts")][0]
    gate = _gate(experts)
    assert (getattr(gate, "__self__", None) is not experts) == kernel
    x = torch.randn(5, 2 * experts.gate_up_proj.shape[1] // 2 if model_type == "qwen3_moe" else
                    experts.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(0))
    _close(gate(x), experts._apply_gate(x), "gate")
