"""The sequence-tiled LoRA MLP: peft's outputs and gradients, the untiled MLP's values, x saved only.

Tiles of 5 rows over 26 tokens (5 full tiles and one of 1 row) against peft and a float64 gold,
in fp32 (tight), bf16 with fp32 and bf16 adapters (2x peft-bf16's error bound) and on NF4 bases,
for separate gate/up projections and for row windows of one fused ``gate_up_proj``;
then against the untiled fused MLP on the same inputs, the automatic choice, what is saved, and
the CUDA twin (tiled within the untiled error bound against a float64 gold).
"""
from __future__ import annotations

import pytest
import torch
from lora_helpers import (H, INTER, MLP, TARGETS, TOKENS, assert_matches_gold_and_peft, case, compare, layers,
                          lora_params, pairs, peftify, quantize_nf4, run, saved_activation_bytes, tiny, TinyMLP,
                          triples)
from tolerances import assert_close_fp32, assert_low_precision_ok, max_rel_err

from corept_kernels.lora import LoraWeights, lora_mlp, lora_weights_from_peft
from corept_kernels.lora import tiled as lora_tiled
from corept_kernels.lora.tiled import TiledLoraMLP, mlp_tile_rows
from corept_kernels.torch_ref import lora as ref

TILE = 5  # 26 rows: five tiles of 5 and one of 1


KINDS = ["mlp", "gate_up"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", ["swiglu", "geglu_tanh"])
def test_fp32_tiled_matches_peft_and_gold(activation, kind):
    pm = peftify(*tiny(kind, activation))
    peft_res, ours_res, gold_res, _, _ = compare(kind, pm, torch.float32, activation, x_noncontig=True,
                                                 tile_rows=TILE)
    assert len(ours_res[1]) == 1 + 2 * len(TARGETS[kind]) and all(g is not None for g in ours_res[1])
    for ours, gold in pairs(ours_res, gold_res):
        assert_close_fp32(ours, gold)
    for ours, theirs in pairs(ours_res, peft_res):
        assert_close_fp32(ours, theirs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fp32_adapters", [False, True], ids=["bf16-adapters", "fp32-adapters"])
def test_bf16_tiled_error_within_peft_bound(fp32_adapters, kind):
    model, targets = tiny(kind)
    pm = peftify(model.to(torch.bfloat16), targets, fp32_adapters=fp32_adapters)
    peft_res, ours_res, gold_res, labels, _ = compare(kind, pm, torch.bfloat16, peft_adapter_dtype=torch.bfloat16,
                                                      tile_rows=TILE)
    adapter_dtype = torch.float32 if fp32_adapters else torch.bfloat16
    for i, (name, ours, gold, theirs) in enumerate(triples(labels, ours_res, gold_res, peft_res)):
        assert ours.dtype == (torch.bfloat16 if i <= 1 else adapter_dtype), name
        assert_low_precision_ok(ours, gold, theirs, name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nf4_tiled_matches_dequantized_reference(compute_dtype, kind):
    model, targets = tiny(kind)
    pm = peftify(quantize_nf4(model, targets, compute_dtype), targets)
    peft_res, ours_res, gold_res, labels, _ = compare(kind, pm, compute_dtype, peft_adapter_dtype=compute_dtype,
                                                      tile_rows=TILE)
    assert_matches_gold_and_peft(compute_dtype, labels, ours_res, gold_res, peft_res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_rows_equal_untiled(dtype):
    """Output and ``dx`` rows are the untiled MLP's up to the GEMM's blocking for another row count
    (fp32 rounding; one bf16 ulp where that flips a rounding); ``dA``/``dB`` sum the same
    products over rows in another grouping, so they agree to fp32 rounding (fp32 adapters)."""
    pm = peftify(TinyMLP().to(dtype), MLP)
    mods = layers(pm, MLP)
    params = lora_params(mods)
    x = torch.randn(*TOKENS, H, dtype=dtype)
    dy = [torch.randn(*TOKENS, H, dtype=dtype)]
    _, whole_fn, _, _ = case("mlp", pm, tile_rows=0)
    _, tiled_fn, _, _ = case("mlp", pm, tile_rows=TILE)
    whole, tiled = run(whole_fn, x, dy, params), run(tiled_fn, x, dy, params)
    for a, b in ((tiled[0][0], whole[0][0]), (tiled[1][0], whole[1][0])):
        if dtype == torch.float32:
            assert_close_fp32(a, b)
        else:
            assert max_rel_err(a, b) <= 2.0 ** -7
    for a, b in zip(tiled[1][1:], whole[1][1:]):
        assert_close_fp32(a, b)


def test_partial_grads_only_down_trains():
    pm = peftify(TinyMLP(), MLP)
    mods = layers(pm, MLP)
    lws = [lora_weights_from_peft(m) for m in mods]
    for p in lora_params(mods[:2]):
        p.requires_grad_(False)
    x, dy = torch.randn(*TOKENS, H), torch.randn(*TOKENS, H)
    peft_grads = run(pm, x, [dy], lora_params(mods[2:]))[1][1:]
    for p in lora_params(mods[2:]):
        p.grad = None
    lora_mlp(x, *lws, tile_rows=TILE).backward(dy)
    for p, theirs in zip(lora_params(mods[2:]), peft_grads):
        assert_close_fp32(p.grad, theirs)
    assert all(p.grad is None for p in lora_params(mods[:2]))


def test_tiled_saves_only_x():
    pm = peftify(TinyMLP().to(torch.bfloat16), MLP)
    x = torch.randn(*TOKENS, H, dtype=torch.bfloat16)
    _, tiled_fn, _, _ = case("mlp", pm, tile_rows=TILE)
    _, whole_fn, _, _ = case("mlp", pm, tile_rows=0)
    n = TOKENS[0] * TOKENS[1]
    assert saved_activation_bytes(tiled_fn, x, pm) == n * H * 2
    assert saved_activation_bytes(whole_fn, x, pm) >= n * (H + 2 * INTER) * 2


def test_automatic_choice(monkeypatch):
    assert mlp_tile_rows(4096, 14336, 2) is None  # 2x2048 tokens of an 8B MLP: 224 MiB, untiled
    assert mlp_tile_rows(100_000, 14336, 2) == (512 << 20) // (4 * 14336)  # 5.3 GiB: tiles of 512 MiB
    assert mlp_tile_rows(100, 8, 2, tile_rows=0) is None
    assert mlp_tile_rows(100, 8, 2, tile_rows=100) is None and mlp_tile_rows(100, 8, 2, tile_rows=7) == 7
    with pytest.raises(ValueError, match="tile_rows"):
        mlp_tile_rows(100, 8, 2, tile_rows=-1)
    calls = []
    real = TiledLoraMLP.apply
    monkeypatch.setattr(TiledLoraMLP, "apply", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(lora_tiled, "MLP_TILE_MIN_BYTES", TOKENS[0] * TOKENS[1] * 2 * INTER * 4 - 1)
    monkeypatch.setattr(lora_tiled, "MLP_TILE_BYTES", 7 * 2 * INTER * 4)
    pm = peftify(TinyMLP(), MLP)
    lws = [lora_weights_from_peft(m) for m in layers(pm, MLP)]
    lora_mlp(torch.randn(*TOKENS, H), *lws)
    assert calls == [7]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's 2-byte dtype halves the bytes: untiled
        lora_mlp(torch.randn(*TOKENS, H), *lws)
    assert calls == [7]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: cuBLAS GEMMs and the Triton kernels")


@pytest.mark.parametrize("dev,lead,hidden,inter,tile", [
    ("cpu", (2, 37), 40, 72, 11),
    pytest.param("cuda", (3, 701), 520, 1400, 333, marks=CUDA),
])
def test_tiled_error_within_untiled_bound(dev, lead, hidden, inter, tile):
    """On CUDA the GEMMs pick other algorithms for other row counts, so bf16 intermediates (``e``,
    ``g``, ``h``, ``de``, ``dg``) can round one ulp apart, and every gradient downstream moves by
    that much (measured on the H200: 5e-6 of the largest ``dA``/``dB``). Tiled and untiled are
    therefore both judged against a float64 gold of the torch twin: the tiled error at most 2x the
    untiled one plus one ulp, for the output, ``dx`` and every adapter gradient."""
    g = torch.Generator(device=dev).manual_seed(0)

    def lw(out_f, in_f, r):
        return LoraWeights((torch.randn(out_f, in_f, generator=g, device=dev) * 0.05).bfloat16(),
                           (torch.randn(r, in_f, generator=g, device=dev) * 0.05).requires_grad_(),
                           (torch.randn(out_f, r, generator=g, device=dev) * 0.05).requires_grad_(), 2.0)

    lws = (lw(inter, hidden, 16), lw(inter, hidden, 16), lw(hidden, inter, 16))
    x = torch.randn(*lead, hidden, generator=g, device=dev).bfloat16()
    dy = torch.randn(*lead, hidden, generator=g, device=dev).bfloat16()

    def grads(fn, xx, weights, dyy):
        xx = xx.clone().requires_grad_()
        for w in weights:
            w.A.grad = w.B.grad = None
        y = fn(xx, weights)
        y.backward(dyy)
        return [y.detach(), xx.grad] + [t.grad.clone() for w in weights for t in (w.A, w.B)]

    gold_w = [LoraWeights(w.weight.double(), w.A.detach().double().requires_grad_(),
                          w.B.detach().double().requires_grad_(), w.scaling) for w in lws]
    gold = grads(lambda xx, ws: ref.lora_mlp(xx, *ws), x.double(), gold_w, dy.double())
    whole = grads(lambda xx, ws: lora_mlp(xx, *ws, tile_rows=0), x, lws, dy)
    tiled = grads(lambda xx, ws: lora_mlp(xx, *ws, tile_rows=tile), x, lws, dy)
    names = ["y", "x.grad"] + [f"{p}.{ab}.grad" for p in ("gate", "up", "down") for ab in ("A", "B")]
    for name, t, w, gd in zip(names, tiled, whole, gold):
        assert t.dtype == w.dtype, name
        assert_low_precision_ok(t, gd, w, name)
