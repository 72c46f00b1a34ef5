"""Fused LoRA MLP / QKV / O vs peft's LoRA layers on the same weights: outputs and every gradient.

The kinds ``gate_up`` and ``qkv_fused`` run corept on row windows of one fused projection's
adapter (``LoraWeights.row_split``; more in test_row_windows.py).

fp32 is checked tightly against a float64 gold run of the torch twin and against peft; bf16 by
"error vs float64 gold <= 2x peft-bf16's error + 1 ulp"; NF4 bases (bitsandbytes Linear4bit,
double quant) against the same computation on the dequantized weight. Shapes and runners are in
``lora_helpers``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from lora_helpers import (ACT_FN, H, HKV, HQ, INTER, MLP, OUT_WIDTHS, QKV, TARGETS, TOKENS,
                          assert_matches_gold_and_peft, case, compare, layers, lora_params, pairs, peftify,
                          quantize_nf4, run, saved_activation_bytes, tiny, TinyAttnProj, TinyMLP, triples)
from peft import LoraConfig
from tolerances import assert_close_fp32, assert_low_precision_ok

from corept_kernels.capabilities import get
from corept_kernels.lora import (LoraWeights, lora_fast_path_reason, lora_mlp, lora_qkv, lora_weights_from_peft,
                                 read_lora_weights)
from corept_kernels.torch_ref import lora as ref


# ----------------------------------------------------------------------------- fp32


KINDS = [("mlp", "swiglu"), ("mlp", "geglu_tanh"), ("mlp", "geglu"), ("qkv", None), ("o", None),
         ("gate_up", "swiglu"), ("gate_up", "geglu_tanh"), ("qkv_fused", None)]


@pytest.mark.parametrize("kind,activation", KINDS)
def test_fp32_matches_peft_and_gold(kind, activation):
    """fp32: corept and its torch twin match peft and the float64 gold, outputs and every grad."""
    pm = peftify(*tiny(kind, activation))
    peft_res, ours_res, gold_res, _, twin_res = compare(kind, pm, torch.float32, activation or "swiglu",
                                                        x_noncontig=True)
    assert len(ours_res[1]) == 1 + 2 * len(TARGETS[kind]) and all(g is not None for g in ours_res[1])
    assert [tuple(o.shape) for o in ours_res[0]] == [tuple(o.shape) for o in peft_res[0]]
    for ours, gold in pairs(ours_res, gold_res):
        assert_close_fp32(ours, gold)
    for ours, theirs in pairs(ours_res, peft_res):
        assert_close_fp32(ours, theirs)
    for twin, theirs in pairs(twin_res, peft_res):
        assert_close_fp32(twin, theirs)


# ----------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("fp32_adapters", [False, True], ids=["bf16-adapters", "fp32-adapters"])
@pytest.mark.parametrize("kind,activation", KINDS)
def test_bf16_error_within_peft_bound(kind, activation, fp32_adapters):
    """bf16 model; error vs float64 gold <= 2x peft's bf16 error + 1 ulp, for outputs and all grads.

    With fp32 adapters (peft's default on a bf16 model) corept runs the adapter branch in fp32 as
    peft does (exact parity with peft: test_rounding.py); the bound here is taken from peft's
    all-bf16 computation, i.e. the same model with its adapters cast to bf16. The gold uses the
    fp32 adapter values in both cases.
    """
    model, targets = tiny(kind, activation)
    pm = peftify(model.to(torch.bfloat16), targets, fp32_adapters=fp32_adapters)
    peft_res, ours_res, gold_res, labels, _ = compare(kind, pm, torch.bfloat16, activation or "swiglu",
                                                      peft_adapter_dtype=torch.bfloat16)
    n_out, adapter_dtype = len(ours_res[0]), torch.float32 if fp32_adapters else torch.bfloat16
    for i, (name, ours, gold, theirs) in enumerate(triples(labels, ours_res, gold_res, peft_res)):
        assert ours.dtype == (torch.bfloat16 if i <= n_out else adapter_dtype), name
        assert_low_precision_ok(ours, gold, theirs, name)


@pytest.mark.parametrize("kind", ["mlp", "qkv"])
def test_autocast_bf16_on_fp32_model(kind):
    """Under CPU autocast (fp32 model and input), both compute in bf16: same output dtype, errors
    judged in bf16 against the float64 gold; x and A/B grads come back in fp32."""
    pm = peftify(*tiny(kind))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_res, ours_res, gold_res, labels, _ = compare(kind, pm, torch.float32)
    assert [o.dtype for o in ours_res[0]] == [o.dtype for o in peft_res[0]] == [torch.bfloat16] * len(ours_res[0])
    assert all(g.dtype == torch.float32 for g in ours_res[1])
    for name, ours, gold, theirs in triples(labels, ours_res, gold_res, peft_res):
        assert_low_precision_ok(ours.bfloat16(), gold, theirs.bfloat16(), name)


@pytest.mark.parametrize("kind,tile_rows", [("mlp", None), ("mlp", 5), ("qkv", None), ("o", None)],
                         ids=["mlp", "mlp-tiled", "qkv", "o"])
def test_backward_called_inside_autocast_matches_outside(kind, tile_rows):
    """autograd hands a backward the autocast state of the ``backward()`` call; the fused
    backwards (and the tiled MLP's recompute) run with autocast off, as their forwards did, so
    calling ``backward()`` inside an autocast region changes nothing (it used to cast their
    matmuls to bf16 and fail)."""
    pm = peftify(*tiny(kind))
    _, ours_fn, _, mods = case(kind, pm, tile_rows=tile_rows)
    params = lora_params(mods)
    width = HQ if kind == "o" else H
    x = torch.randn(*TOKENS, width)
    dys = [torch.randn(*TOKENS, w) for w in OUT_WIDTHS[kind]]
    outside = run(ours_fn, x, dys, params)
    xx = x.clone().requires_grad_()
    for p in params:
        p.grad = None
    outs = ours_fn(xx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.autograd.backward(outs if isinstance(outs, tuple) else (outs,), dys)
    for a, b in zip([xx.grad] + [p.grad for p in params], outside[1]):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- NF4 base


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["mlp", "qkv", "gate_up"])
def test_nf4_base_matches_dequantized_reference(kind, compute_dtype):
    names = TARGETS[kind]  # gate_up: each window dequantizes the whole weight and takes its rows
    model = quantize_nf4(tiny(kind)[0], names, compute_dtype)
    pm = peftify(model, names)
    mods = layers(pm, names)
    assert all(type(m).__name__ == "Linear4bit" and lora_weights_from_peft(m).is_4bit for m in mods)
    # bf16: the bound comes from peft's bf16 computation (adapters cast to bf16), as in the bf16 test
    peft_res, ours_res, gold_res, labels, _ = compare(kind, pm, compute_dtype, peft_adapter_dtype=compute_dtype)
    assert peft_res[1][0] is not None, "peft's 4-bit path lost the input gradient (CPU repack trap)"
    assert_matches_gold_and_peft(compute_dtype, labels, ours_res, gold_res, peft_res)


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("setting", ["fp32", "bf16+fp32-adapters", "nf4-bf16"])
def test_mlp_saves_less_than_peft(setting):
    dtype = torch.float32 if setting == "fp32" else torch.bfloat16
    model = TinyMLP()
    if setting == "nf4-bf16":
        model = quantize_nf4(model, MLP, torch.bfloat16)
    pm = peftify(model.to(dtype) if setting != "nf4-bf16" else model, MLP)
    _, ours_fn, _, _ = case("mlp", pm)
    x = torch.randn(*TOKENS, H, dtype=dtype)
    ours, theirs = saved_activation_bytes(ours_fn, x, pm), saved_activation_bytes(pm, x, pm)
    n, e = TOKENS[0] * TOKENS[1], dtype.itemsize
    adapter = next(p.dtype for name, p in pm.named_parameters() if "lora_A" in name)
    ea = torch.promote_types(adapter, dtype).itemsize  # the xa products live in the adapter dtype
    assert ours == n * (H + 2 * INTER) * e + n * (8 + 8 + 4) * ea  # x, gate/up projections; xa of gate, up, down
    assert ours < theirs, (ours, theirs)
    if setting == "fp32":
        assert theirs - ours >= 2 * n * INTER * e  # peft also keeps act(e) and act(e)*g


@pytest.mark.parametrize("kind", ["qkv", "o"])
def test_attn_proj_saves_no_more_than_peft(kind):
    for dtype, fp32_adapters in ((torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)):
        model, targets = tiny(kind)
        pm = peftify(model.to(dtype), targets, fp32_adapters=fp32_adapters)
        peft_fn, ours_fn, _, _ = case(kind, pm)
        x = torch.randn(*TOKENS, HQ if kind == "o" else H, dtype=dtype)
        ours, theirs = saved_activation_bytes(ours_fn, x, pm), saved_activation_bytes(peft_fn, x, pm)
        if dtype == torch.bfloat16 and fp32_adapters:
            assert ours < theirs, (kind, ours, theirs)  # peft keeps an fp32 copy of x per linear
        else:
            assert ours <= theirs, (kind, dtype, ours, theirs)


# ----------------------------------------------------------------------------- fast-path reasons


def _lora_layer(bias=False, **cfg):
    return layers(peftify(TinyMLP(bias=bias), MLP, **cfg), ("gate_proj",))[0]


@pytest.mark.parametrize("cfg,expected", [
    ({"lora_dropout": 0.1}, "lora_dropout=0.1"),
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "lora_bias"),
])
def test_fast_path_reason_config(cfg, expected):
    layer = _lora_layer(**cfg)
    reason = lora_fast_path_reason(layer)
    assert reason is not None and expected in reason, reason
    with pytest.raises(ValueError, match="does not apply"):
        lora_weights_from_peft(layer)


def test_fast_path_reason_plain_bias_merged_disabled_multi():
    assert "base layer has bias" in lora_fast_path_reason(_lora_layer(bias=True))
    assert lora_fast_path_reason(_lora_layer(bias=True), allow_bias=True) is None
    pm = peftify(TinyMLP(), MLP)
    layer = layers(pm, ("gate_proj",))[0]
    assert lora_fast_path_reason(layer) is None
    lw = lora_weights_from_peft(layer)
    assert lw.A is layer.lora_A["default"].weight and lw.B is layer.lora_B["default"].weight
    assert lw.scaling == layer.scaling["default"] == 2.0 and lw.bias is None
    unchecked = read_lora_weights(layer)  # the same read, for callers that ran the check themselves
    assert (unchecked.weight, unchecked.A, unchecked.B, unchecked.bias) == (lw.weight, lw.A, lw.B, lw.bias)
    assert unchecked.scaling == lw.scaling and unchecked.quant_state is lw.quant_state
    pm.add_adapter("other", LoraConfig(r=4, target_modules=list(MLP)))
    pm.base_model.set_adapter(["default", "other"])
    assert "2 active adapters" in lora_fast_path_reason(layer)
    pm.base_model.set_adapter("default")
    assert lora_fast_path_reason(layer) is None
    pm.merge_adapter()
    assert "merged" in lora_fast_path_reason(layer)
    pm.unmerge_adapter()
    with pm.disable_adapter():
        assert "disabled" in lora_fast_path_reason(layer)
    assert lora_fast_path_reason(layer) is None
    assert "not a peft LoRA linear" in lora_fast_path_reason(nn.Linear(3, 3))


def test_fast_path_reason_quantized_bases():
    import bitsandbytes as bnb

    m8 = TinyMLP()
    m8.gate_proj = bnb.nn.Linear8bitLt(H, INTER, bias=False, has_fp16_weights=False)
    m8.is_loaded_in_8bit = True
    assert "8-bit" in lora_fast_path_reason(layers(peftify(m8, ("gate_proj",)), ("gate_proj",))[0])
    layer = layers(peftify(quantize_nf4(TinyMLP(), MLP, torch.bfloat16), MLP), ("gate_proj",))[0]
    assert lora_fast_path_reason(layer) is None
    state = layer.base_layer.weight.quant_state
    state.packing_format_for_cpu = True  # as after an eval forward with the AVX512-BF16 repack
    try:
        assert "repacked" in lora_fast_path_reason(layer)
    finally:
        state.packing_format_for_cpu = False


def test_base_bias_supported_when_allowed():
    pm = peftify(TinyAttnProj(bias=True), QKV)
    mods = layers(pm, QKV)
    lws = [lora_weights_from_peft(m, allow_bias=True) for m in mods]
    x, dys = torch.randn(*TOKENS, H), [torch.randn(*TOKENS, n) for n in (HQ, HKV, HKV)]
    for lw in lws:
        lw.bias.requires_grad_(True)  # trained bias (peft bias="all"): its grad is computed too
    params = lora_params(mods) + [lw.bias for lw in lws]
    peft_res = run(pm, x, dys, params)
    ours_res = run(lambda xx: lora_qkv(xx, *lws), x, dys, params)
    for ours, theirs in pairs(ours_res, peft_res):
        assert_close_fp32(ours, theirs)


# ----------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["swiglu", "geglu_tanh", "geglu"])
def test_glu_kernels_triton_vs_torch(activation, dtype):
    e, g, dh = (torch.randn(3, 26, INTER) * torch.tensor([3.0, 1.0, 1.0])[:, None, None]).to(dtype).unbind(0)
    tol = dict(rtol=2 ** -7, atol=2 ** -7) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    fwd, bwd = get("lora_glu"), get("lora_glu_backward")  # the Triton kernels and their torch twins
    torch.testing.assert_close(fwd.triton_fn(e, g, activation), fwd.reference_fn(e, g, activation), **tol)
    bufs = [[t.clone() for t in (dh, e, g)] for _ in range(2)]
    bwd.triton_fn(*bufs[0], activation)
    bwd.reference_fn(*bufs[1], activation)
    e64, g64 = e.double().requires_grad_(), g.double().requires_grad_()
    h64 = ACT_FN[activation](e64) * g64
    de64, dg64 = torch.autograd.grad(h64, (e64, g64), dh.double())
    for got in bufs:
        for out, want in zip(got, (h64, de64, dg64)):
            torch.testing.assert_close(out.double(), want.detach(), **tol)


def test_partial_grads_and_second_backward_fails_loudly():
    pm = peftify(TinyMLP(), MLP)
    mods = layers(pm, MLP)
    lws = [lora_weights_from_peft(m) for m in mods]
    for p in lora_params(mods[:2]):
        p.requires_grad_(False)  # only down's adapter trains, x needs no grad: h is recomputed
    x, dy = torch.randn(*TOKENS, H), torch.randn(*TOKENS, H)
    peft_grads = run(pm, x, [dy], lora_params(mods[2:]))[1][1:]
    for p in lora_params(mods[2:]):
        p.grad = None
    lora_mlp(x, *lws).backward(dy)
    for p, theirs in zip(lora_params(mods[2:]), peft_grads):
        assert_close_fp32(p.grad, theirs)
    assert all(p.grad is None for p in lora_params(mods[:2]))
    for p in lora_params(mods[:2]):
        p.requires_grad_(True)
    y = lora_mlp(x.requires_grad_(), *lws)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()  # the backward overwrote its saved gate/up projections in place


def test_registered_with_capabilities():
    from corept_kernels.lora import api

    for name, fn, twin in (("lora_mlp", api._lora_mlp_fused, ref.lora_mlp),
                           ("lora_qkv", api._lora_qkv_fused, ref.lora_qkv), ("lora_o", api._lora_o_fused, ref.lora_o)):
        info = get(name)
        assert info.triton_fn is fn and info.reference_fn is twin and info.has_backward
        assert set(info.devices) == {"cuda", "cpu"} and info.notes


def test_lora_weights_validation():
    w = torch.randn(6, 5)
    with pytest.raises(ValueError, match="A is"):
        LoraWeights(w, torch.randn(2, 4), torch.randn(6, 2), 1.0)
    with pytest.raises(ValueError, match="requires grad"):
        LoraWeights(w.requires_grad_(), torch.randn(2, 5), torch.randn(6, 2), 1.0)
    with pytest.raises(ValueError, match="activation"):
        lora_mlp(torch.randn(3, 5), *[LoraWeights(torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2), 1.0)] * 2,
                 LoraWeights(torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2), 1.0), activation="relu")


def test_mlp_backward_frees_h_before_the_gate_up_phase(monkeypatch):
    """The ``[N, I]`` buffer that holds ``dh`` and then ``h`` is released once ``dA`` of the down
    projection is formed, so the gate/up input gradient (``dx`` plus a base product in flight, and
    a dequantized weight on 4-bit bases) never coexists with it."""
    import weakref

    from corept_kernels.lora import mlp as lm

    held, seen = [], []
    real_glu, real_input = lm.glu_backward_, lm._backward_input

    def glu(h, e, g, activation):
        held.append(weakref.ref(h))
        return real_glu(h, e, g, activation)

    def backward_input(douts, dxa, lws, As, weights=None):
        if held:  # the gate/up call comes after the GLU backward
            seen.append(held[0]() is None)
        return real_input(douts, dxa, lws, As, weights)

    monkeypatch.setattr(lm, "glu_backward_", glu)
    monkeypatch.setattr(lm, "_backward_input", backward_input)
    g = torch.Generator().manual_seed(0)

    def lw(out_f, in_f, r):
        return LoraWeights((torch.randn(out_f, in_f, generator=g) * 0.1).bfloat16(),
                           (torch.randn(r, in_f, generator=g) * 0.1).requires_grad_(),
                           (torch.randn(out_f, r, generator=g) * 0.1).requires_grad_(), 1.0)

    x = torch.randn(*TOKENS, H, generator=g).bfloat16().requires_grad_()
    lora_mlp(x, lw(INTER, H, 8), lw(INTER, H, 8), lw(H, INTER, 4), "swiglu").float().sum().backward()
    assert held and seen == [True], (len(held), seen)
