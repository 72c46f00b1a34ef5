"""``corept.get_peft_model``: q/k/v as one ``lora_qkv`` call, against plain peft.

Each test builds one tiny model twice: plain peft (the reference) and ``corept.get_peft_model``
with the same adapters (randomised by name: peft zero-initialises ``B``). ``corept.patch(only=
["attention"])`` first, where the fused LoRA path is to be judged alone: the built-ins leave
attention to transformers, so nothing but the LoRA forwards is replaced.
"""
from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_model

import corept
from corept.lora.qkv_group import QKVGroup
from corept.testing.builders import randomize_lora
from corept.testing.tolerances import assert_bf16_within, assert_fp32_close

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[5, 9, 17, 33, 2, 64, 128, 200], [7, 7, 1, 250, 99, 3, 45, 12]])


def _pair(model_type: str, dtype=torch.float32, only=("attention",), **overrides):
    """(plain peft model, corept peft model) with identical weights and adapters, in train mode."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model(model_type, **overrides).to(dtype)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
    pat = copy.deepcopy(base)
    if only is not None:
        corept.patch(pat, only=list(only))
    pat = corept.get_peft_model(pat, r=4, lora_alpha=8, target_modules=TARGETS, use_gradient_checkpointing=False)
    for m in (ref, pat):
        randomize_lora(m, seed=3)
        m.train()
    return ref, pat


def _step(model):
    """Loss and every trainable gradient of one training step."""
    for p in model.parameters():
        p.grad = None
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _attn(model, layer=0):
    return model.get_base_model().model.layers[layer].self_attn


def test_qkv_grouped_reported_and_matches_peft_fp32():
    ref, pat = _pair("llama")
    rep = corept.report(pat)
    assert rep.applied["lora"] == "triton:lora_qkv x6, triton:lora_o x2, triton:lora_mlp x2", rep.applied
    assert "lora" not in rep.fallbacks, rep.fallbacks
    for layer in range(2):
        attn = _attn(pat, layer)
        group = attn.q_proj.corept_qkv_group
        assert isinstance(group, QKVGroup) and group.mods == (attn.q_proj, attn.k_proj, attn.v_proj)
        assert attn.k_proj.corept_qkv_group is group and attn.v_proj.corept_qkv_group is group
        assert "corept_qkv_group" not in attn.o_proj.__dict__
    (loss, grads), (ref_loss, ref_grads) = _step(pat), _step(ref)
    assert_fp32_close("loss", loss, ref_loss)
    assert set(grads) == set(ref_grads) and len(grads) == 28
    for n in ref_grads:
        assert_fp32_close(n, grads[n], ref_grads[n])
    assert all(g._kept is None for g in (_attn(pat, i).q_proj.corept_qkv_group for i in range(2)))


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2"])
def test_bf16_fused_lora_follows_peft(model_type):
    """bf16 model, fp32 adapters: the fused path (MLP, q/k/v, o) rounds where peft does from values
    equal to fp32 precision (``corept_kernels.lora.branch``), so the loss and every gradient meet
    the bf16 rule against an fp32 gold copy (measured: at most 1.6x peft's own error; the bound is
    2x plus one ulp)."""
    ref, pat = _pair(model_type, torch.bfloat16)
    gold = copy.deepcopy(ref).to(torch.float32)
    assert "lora_qkv x6" in corept.report(pat).applied["lora"]
    (loss, grads), (ref_loss, ref_grads), (gold_loss, gold_grads) = _step(pat), _step(ref), _step(gold)
    assert_bf16_within("loss", loss, ref_loss, gold_loss)
    for n, g in ref_grads.items():
        assert grads[n].dtype == g.dtype == torch.float32, n
        assert_bf16_within(n, grads[n], g, gold_grads[n])


def test_qwen2_biased_qkv_run_grouped_with_their_bias():
    """qwen2's q/k/v carry a base bias: the grouped fused call adds it (and its gradient would flow
    if it trained); loss and every gradient match peft's."""
    ref, pat = _pair("qwen2")
    rep = corept.report(pat)
    assert "lora_qkv" in rep.applied["lora"], rep.applied
    assert "lora" not in rep.fallbacks, rep.fallbacks
    assert "corept_qkv_group" in _attn(pat).q_proj.__dict__
    assert _attn(pat).q_proj.base_layer.bias is not None
    (loss, grads), (ref_loss, ref_grads) = _step(pat), _step(ref)
    assert_fp32_close("loss", loss, ref_loss)
    for n in ref_grads:
        assert_fp32_close(n, grads[n], ref_grads[n])


def test_unpatch_restores_peft_forwards_bitwise():
    ref, pat = _pair("llama", only=None)  # every component patched, then undone
    _step(pat)
    corept.unpatch(pat)
    for name, m in pat.named_modules():
        assert not any(k.startswith("corept_") or k == "forward" for k in m.__dict__), name
    (loss, grads), (ref_loss, ref_grads) = _step(pat), _step(ref)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)


def test_group_keeps_outputs_only_for_the_same_input_and_weights():
    ref, pat = _pair("llama")
    attn, rattn = _attn(pat), _attn(ref)
    group = attn.q_proj.corept_qkv_group
    x1, x2 = torch.randn(2, 5, 64), torch.randn(2, 5, 64)

    def unfused(name, x):
        return getattr(rattn, name)(x)

    q1 = attn.q_proj(x1)
    assert set(group._kept[3]) == {1, 2}
    k2 = attn.k_proj(x2)  # another input: a fresh fused call, not x1's kept k
    v2 = attn.v_proj(x2)
    assert set(group._kept[3]) == {0}  # x2's q, never asked for: kept until the next call replaces it
    for got, want in ((q1, unfused("q_proj", x1)), (k2, unfused("k_proj", x2)), (v2, unfused("v_proj", x2))):
        assert_fp32_close("proj", got, want)

    q = attn.q_proj(x1)
    with torch.no_grad():  # an optimizer step between the calls: kept outputs are stale
        for m in (attn.k_proj, rattn.k_proj):
            m.lora_B["default"].weight.add_(0.5)
    assert_fp32_close("k after step", attn.k_proj(x1), unfused("k_proj", x1))
    assert_fp32_close("q", q, unfused("q_proj", x1))
    clone = copy.deepcopy(pat)  # kept outputs (non-leaf tensors) are not copied
    assert _attn(clone).q_proj.corept_qkv_group._kept is None
    assert _attn(clone).q_proj.corept_qkv_group.mods[0] is _attn(clone).q_proj


def test_eval_and_disabled_adapters_take_peft_path():
    ref, pat = _pair("llama")
    x = torch.randn(2, 5, 64)
    attn, rattn = _attn(pat), _attn(ref)
    group = attn.q_proj.corept_qkv_group
    pat.eval()
    ref.eval()
    assert torch.equal(attn.k_proj(x), rattn.k_proj(x)) and group._kept is None
    pat.train()
    ref.train()
    with pat.disable_adapter(), ref.disable_adapter():
        assert not group.ready(x)
        assert torch.equal(attn.v_proj(x), rattn.v_proj(x)) and group._kept is None
    assert group.ready(x)


def test_sampling_in_training_mode_takes_peft_path(monkeypatch):
    """Without gradients, a decode-sized call in training mode (TRL's GRPO samples so) runs peft's
    forward; a call as large as checkpointing's no-grad first pass still runs fused (its memory)."""
    from corept.components import lora as lora_component
    from corept.lora.fast_path import SMALL_NO_GRAD_TOKENS

    ref, pat = _pair("llama")
    calls = []
    real = lora_component.lora_mlp
    monkeypatch.setattr(lora_component, "lora_mlp", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    mlp, rmlp = pat.base_model.model.model.layers[0].mlp, ref.base_model.model.model.layers[0].mlp
    pat.train()
    ref.train()
    small, large = torch.randn(2, 3, 64), torch.randn(1, SMALL_NO_GRAD_TOKENS, 64)
    with torch.no_grad():
        assert torch.equal(mlp(small), rmlp(small)) and calls == []  # peft's own forward: bitwise
        assert_fp32_close("large no-grad call", mlp(large), rmlp(large))
    assert calls == [large.shape]
    mlp(small).sum().backward()  # with gradients: fused at any size
    assert calls == [large.shape, small.shape]


def _largest_fp32_temporary(fn) -> int:
    """Bytes of the largest fp32 tensor any op creates while ``fn`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and o.dtype == torch.float32 and o._base is None:
                    Largest.biggest = max(Largest.biggest, o.numel() * o.element_size())
            return out

    with Largest():
        fn()
    return Largest.biggest


def test_no_grad_training_forward_takes_fused_path_bounded_by_chunks(monkeypatch):
    """Checkpointing's first pass (train mode, ``no_grad``): the fused path, so the fp32 adapter
    temporaries stay within ``CHUNK_BYTES`` where peft's path makes whole ``[N, I]`` fp32 products;
    outputs peft's in bf16 but for rare one-ulp flips (``corept_kernels.lora.branch``)."""
    import corept_kernels.lora.chunks as lb

    # intermediate 512: the fp32 [N, 2r] products (r-sized, any N) stay far below an eighth of [N, I]
    ref, pat = _pair("llama", torch.bfloat16, only=None, intermediate_size=512)
    mlp, rmlp = pat.get_base_model().model.layers[0].mlp, ref.get_base_model().model.layers[0].mlp
    x = torch.randn(4, 64, 64, dtype=torch.bfloat16)
    n_i_fp32 = x.shape[0] * x.shape[1] * mlp.gate_proj.base_layer.out_features * 4
    monkeypatch.setattr(lb, "CHUNK_BYTES", n_i_fp32 // 8)
    with torch.no_grad():
        assert _largest_fp32_temporary(lambda: mlp(x)) <= n_i_fp32 // 8
        assert _largest_fp32_temporary(lambda: rmlp(x)) >= n_i_fp32  # the control: peft's path
        ours, theirs = mlp(x), rmlp(x)
        # the bounds of kernels/tests/lora/lora_helpers.py (TWIN_*): rare one-ulp flips, propagated
        share = (ours != theirs).float().mean().item()
        rel = ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()
        assert share <= 0.08 and rel <= 1.2e-3, (share, rel)


def test_mlp_tile_rows_tiles_both_checkpointing_passes_and_matches_peft(monkeypatch):
    """``mlp_tile_rows=3``: the fused MLPs run over tiles of 3 tokens in checkpointing's first pass
    and its recompute (16 tokens per call); loss and every gradient still match peft."""
    from corept_kernels.lora import tiled as lora_tiled
    from peft import LoraConfig, get_peft_model

    from corept.lora import fast_path

    # the first pass runs without gradients on 16 tokens: fused only above the small-call threshold
    monkeypatch.setattr(fast_path, "SMALL_NO_GRAD_TOKENS", 0)
    tiles = []
    real = lora_tiled.TiledLoraMLP.apply
    monkeypatch.setattr(lora_tiled.TiledLoraMLP, "apply", lambda *a: tiles.append(a[3]) or real(*a))
    base = tiny_model("llama")
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
    pat = corept.get_peft_model(corept.patch(copy.deepcopy(base), only=["attention"]), r=4, lora_alpha=8,
                                target_modules=TARGETS, use_gradient_checkpointing="corept", mlp_tile_rows=3)
    for m in (ref, pat):
        randomize_lora(m, seed=3)
        m.train()
    (loss, grads), (ref_loss, ref_grads) = _step(pat), _step(ref)
    assert tiles == [3] * 4, tiles  # 2 layers x (first pass + recompute)
    assert_fp32_close("loss", loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        assert_fp32_close(n, grads[n], ref_grads[n])


@pytest.mark.parametrize("bad", [-1, 2.5, True, "auto"])
def test_mlp_tile_rows_rejects_bad_values(bad):
    with pytest.raises(corept.errors.InvalidOptionsError, match="mlp_tile_rows"):
        corept.get_peft_model(tiny_model("llama"), r=4, mlp_tile_rows=bad)


def test_default_targets_are_the_linears_the_model_has(caplog):
    """``target_modules="all-linear"``: every linear inside the attention and MLP modules; declared
    ``lora_targets`` the model lacks are warned about and dropped."""
    from corept import Architecture, ModuleRoles
    from corept.lora.setup import default_targets
    from corept.registry.resolution import bind

    model = tiny_model("llama")
    arch = corept.architecture_of(corept.patch(model))
    assert default_targets(model, arch) == sorted(TARGETS)
    declared = bind(Architecture("llama", ModuleRoles.standard("Llama"), lora_targets=("q_proj", "qkv_proj")),
                    "test", None, model.config)
    with caplog.at_level("WARNING", logger="corept"):
        assert default_targets(model, declared) == ["q_proj"]
    assert "declared LoRA target(s) ['qkv_proj'] are not linear layers" in caplog.text
