"""NF4 stacked experts (QLoRA on MoE): ``corept.load(..., load_in_4bit=True)`` quantizes the experts
corept serves; training with LoRA on them matches peft on the same model with the experts
dequantized (loss, every adapter gradient, the router's), the backward dequantizes again instead of
keeping 16-bit copies, merged saving and ``corept.unpatch`` dequantize, fp32 on CPU."""
import bitsandbytes as bnb
import pytest
import torch

import corept
from corept import tiny
from corept.components import experts_4bit as q4
from corept.saving.merge import merged_state_dict

CONFIGS = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, swiglu_limit=7.0),
}
IDS = torch.randint(0, tiny.TINY_SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(CONFIGS))
def folder(request, tmp_path_factory):
    mt = request.param
    model = tiny.tiny_model(mt, **CONFIGS[mt])
    with torch.no_grad():  # transformers initialises biases to zero: give them values
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    tok = tiny.tiny_tokenizer(["a b c"])
    return tiny.save_tiny(model, tok, tmp_path_factory.mktemp(mt))


def _experts(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def _load(folder):
    model, _ = corept.load(str(folder), load_in_4bit=True, dtype=torch.float32, max_seq_length=64)
    return model


def _lora(model, cfg):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=sorted(cfg.target_modules),
                                            target_parameters=sorted(cfg.target_parameters)))


def _randomize_lora(*models):
    with torch.no_grad():
        for named in zip(*(m.named_parameters() for m in models)):
            assert len({n for n, _ in named}) == 1
            if "lora_" in named[0][0]:
                v = torch.randn(named[0][1].shape, generator=torch.Generator().manual_seed(len(named[0][0]))) * 0.1
                for _, p in named:
                    p.copy_(v)


def test_load_in_4bit_quantizes_the_experts_it_serves(folder):
    model = _load(folder)
    experts = _experts(model)
    assert len(experts) == 2
    for m in experts:
        for name in q4.WEIGHTS:
            w = getattr(m, name)
            assert isinstance(w, bnb.nn.Params4bit) and w.quant_type == "nf4" and w.quant_state.nested
            assert tuple(w.ds_shape) == tuple(w.quant_state.shape) and len(w.ds_shape) == 3
    r = corept.report(model)
    assert "expert_linear" in r.applied["experts"]
    assert r.settings["experts_4bit"] == "4 stacked expert weights in NF4 (2 experts modules)"
    # unpatching gives transformers its 16-bit experts back: same weights, same logits
    before = {id(m): {n: q4.dense(m, n).clone() for n in q4.WEIGHTS} for m in experts}
    with torch.no_grad():
        patched_logits = model(IDS).logits
    # merged saving writes them dequantized, under transformers' names and shapes
    sd = merged_state_dict(model, torch.float32)
    names = {id(m): n for n, m in model.named_modules()}
    for m in experts:
        for name in q4.WEIGHTS:
            torch.testing.assert_close(sd[f"{names[id(m)]}.{name}"], before[id(m)][name], rtol=0, atol=0)
    corept.unpatch(model)
    for m in experts:
        for name in q4.WEIGHTS:
            w = getattr(m, name)
            assert not q4.is_4bit(w) and not w.requires_grad
            torch.testing.assert_close(w, before[id(m)][name], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, patched_logits, rtol=1e-4, atol=1e-5)


def test_lora_on_nf4_experts_trains_like_peft_on_the_dequantized_experts(folder, monkeypatch):
    model = corept.get_peft_model(_load(folder), r=4, lora_alpha=8, use_gradient_checkpointing=False)
    cfg = model.peft_config["default"]
    assert sorted(cfg.target_parameters) == ["experts.down_proj", "experts.gate_up_proj"]
    ref_base = _load(folder)
    corept.unpatch(ref_base)  # transformers' forwards, the experts dequantized (bit-equal values)
    ref = _lora(ref_base, cfg)
    _randomize_lora(model, ref)
    assert "expert_linear" in corept.report(model).applied["lora"]

    calls = []
    dequantize = q4.dequantize
    monkeypatch.setattr(q4, "dequantize", lambda w: calls.append(w) or dequantize(w))
    model.train()
    ref.train()
    out, want = model(IDS, labels=IDS), ref(IDS, labels=IDS)
    forward_calls = len(calls)
    assert forward_calls == 4  # gate_up and down, 2 layers
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    want.loss.backward()
    # the backward needed each weight again: it dequantized it rather than keep a 16-bit copy
    assert len(calls) - forward_calls == 4
    grads = dict(model.named_parameters())
    compared = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert sum("experts" in n for n in compared) == 8
    for name in compared:
        want_g = dict(ref.named_parameters())[name].grad
        torch.testing.assert_close(grads[name].grad, want_g, rtol=1e-4, atol=1e-5 * want_g.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")
    # the router is trained in full fine-tuning only; its gradient still flows through the patched experts
    x = model.get_base_model().model.embed_tokens(IDS).detach().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    model.get_base_model().model(inputs_embeds=x).last_hidden_state.sum().backward()
    ref.get_base_model().model(inputs_embeds=x_ref).last_hidden_state.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5 * x_ref.grad.abs().max().item())

    merged = merged_state_dict(model, torch.float32)
    want_sd = merged_state_dict(ref, torch.float32)
    assert set(merged) == set(want_sd)
    for key, value in want_sd.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
