"""A fused ``gate_up_proj`` LoRA linear runs as the one linear it is, with peft's rounding points.

peft puts one adapter on ``gate_up_proj`` (``W`` ``[2F, H]``, ``A`` ``[r, H]``, ``B`` ``[2F, r]``)
and the model splits its output, ``gate, up = y.chunk(2, -1)`` (Phi-3). ``lora_mlp`` given the two
row windows (``gu.row_split(2)``) must then round where peft rounds for that one linear: one base
product and one branch forward, one ``dxa`` / ``dA`` / ``dB`` and one ``dy W`` over ``[N, 2F]`` in
backward. Rounding the halves as two linears put the upstream LoRA gradients of a bf16 Phi-3 above
the bf16 rule's bound; here the MLP runs behind another LoRA linear (``pre``), whose adapter
gradients see the MLP's ``dx`` undiluted:

* the bf16 rule (error vs a float64 gold <= 2x the unpatched peft model's error + 1 ulp) on the
  output, ``dx`` and every adapter gradient, ``pre``'s included. On this one-layer model the
  two-linear rounding still met it (error at most 0.38 of the bound): the drift it causes took a
  deeper model to cross the bound;
* so also the stricter rounding-twin check against the unpatched peft model (rare one-ulp flips
  at most), which the two-linear rounding failed in every case: 47-52% of the MLP's ``dx``
  elements differed from peft's.

Also: which windows are fused, what is saved, a 4-bit base dequantized once per pass, the gated
activation's kernels on column halves, the tiled path, a base bias, partial gradients.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from lora_helpers import (ACT_FN, H, INTER, TOKENS, TWIN_GRAD_REL_L2, assert_rounding_twin, gold_weights, layers,
                          lora_params, peftify, quantize_nf4, rounding_twin_stats, run, saved_activation_bytes)
from tolerances import assert_close_fp32, assert_low_precision_ok

from corept_kernels.lora import LoraWeights, lora_mlp, lora_weights_from_peft, read_lora_weights
from corept_kernels.torch_ref import lora as ref

NAMES = ("pre", "gate_up_proj", "down_proj")


class PreFusedMLP(nn.Module):
    """``down(act(gate) * up)`` with ``gate, up = gate_up_proj(pre(x)).chunk(2, -1)``: a LoRA linear
    ``pre`` feeding a Phi-3-style MLP, so ``pre``'s gradients are made from the MLP's ``dx`` alone."""

    def __init__(self, activation: str = "swiglu", bias: bool = False):
        super().__init__()
        self.pre = nn.Linear(H, H, bias=False)
        self.gate_up_proj = nn.Linear(H, 2 * INTER, bias=bias)
        self.down_proj = nn.Linear(INTER, H, bias=False)
        self.act = ACT_FN[activation]

    def mlp(self, z):
        gate, up = self.gate_up_proj(z).chunk(2, -1)
        return self.down_proj(self.act(gate) * up)

    def forward(self, x, mlp=None):
        return (mlp or self.mlp)(self.pre(x))


def _model(dtype, fp32_adapters=True, activation="swiglu", nf4=False, bias=False):
    model = PreFusedMLP(activation, bias).to(dtype)
    if nf4:
        quantize_nf4(model, NAMES[1:], dtype)
    return peftify(model, NAMES, fp32_adapters=fp32_adapters)


def _fns(pm, activation="swiglu", tile_rows=None, allow_bias=False):
    """(peft fn, corept fn: pre by peft then ``lora_mlp`` on the windows, float64 gold fn, gold params)."""
    net = pm.base_model.model
    pre, gu, down = layers(pm, NAMES)

    def ours(x):
        gate_up = lora_weights_from_peft(gu, allow_bias=allow_bias)
        return net(x, mlp=lambda z: lora_mlp(z, *gate_up.row_split(2), lora_weights_from_peft(down),
                                             activation=activation, tile_rows=tile_rows))

    g_pre, g_gu, g_down = gold_weights((pre, gu, down))

    def gold(x):
        return ref.lora_mlp(ref.lora_linear(x, g_pre), *g_gu.row_split(2), g_down, activation=activation)

    return net, ours, gold, [t for lw in (g_pre, g_gu, g_down) for t in (lw.A, lw.B)]


def _inputs(dtype, seed=3, n=None):
    g = torch.Generator().manual_seed(seed)
    lead = (n,) if n else TOKENS
    return torch.randn(*lead, H, generator=g).to(dtype), [torch.randn(*lead, H, generator=g).to(dtype)]


def _run_and_mlp_dx(pm, fn, x, dys, params):
    """:func:`lora_helpers.run` of ``fn``, plus the gradient of the MLP's input (``pre``'s output)."""
    seen = []
    hook = layers(pm, NAMES[:1])[0].register_forward_hook(lambda m, i, out: seen.append(out) or out.retain_grad())
    try:
        res = run(fn, x, dys, params)
    finally:
        hook.remove()
    return res, seen[-1].grad


def _three_runs(pm, dtype, activation="swiglu", tile_rows=None, seed=3):
    """(corept, unpatched peft, float64 gold), each ``(outputs, [x.grad, pre/gate_up/down A, B grads])``,
    and the MLP's ``dx`` of corept and of peft."""
    peft_fn, ours_fn, gold_fn, gold_params = _fns(pm, activation, tile_rows)
    x, dys = _inputs(dtype, seed)
    params = lora_params(layers(pm, NAMES))
    (ours, ours_dx), (theirs, theirs_dx) = (_run_and_mlp_dx(pm, fn, x, dys, params) for fn in (ours_fn, peft_fn))
    gold = run(gold_fn, x.double(), [d.double() for d in dys], gold_params)
    return ours, theirs, gold, (ours_dx, theirs_dx)


LABELS = ["y", "x.grad"] + [f"{n}.{ab}.grad" for n in NAMES for ab in ("A", "B")]
BF16_CASES = [("swiglu", True, False), ("swiglu", False, False), ("geglu_tanh", True, False),
              ("geglu_tanh", False, False), ("swiglu", True, True), ("geglu_tanh", False, True)]
BF16_IDS = [f"{a}-{'fp32' if f else 'bf16'}-adapters{'-nf4' if q else ''}" for a, f, q in BF16_CASES]


@pytest.mark.parametrize("tile_rows", [None, 5], ids=["untiled", "tiled"])
@pytest.mark.parametrize("activation,fp32_adapters,nf4", BF16_CASES, ids=BF16_IDS)
def test_bf16_upstream_grads_within_rule(activation, fp32_adapters, nf4, tile_rows):
    """bf16 model: error vs the float64 gold <= 2x the unpatched peft model's own error + 1 ulp,
    for the output, ``dx`` and every adapter gradient (``pre``'s: the MLP's ``dx`` upstream)."""
    pm = _model(torch.bfloat16, fp32_adapters, activation, nf4)
    ours, theirs, gold, _ = _three_runs(pm, torch.bfloat16, activation, tile_rows)
    for name, a, g, t in zip(LABELS, ours[0] + ours[1], gold[0] + gold[1], theirs[0] + theirs[1]):
        assert_low_precision_ok(a, g, t, name)


@pytest.mark.parametrize("tile_rows", [None, 5], ids=["untiled", "tiled"])
@pytest.mark.parametrize("activation,fp32_adapters,nf4", BF16_CASES, ids=BF16_IDS)
def test_bf16_follows_peft_rounding(activation, fp32_adapters, nf4, tile_rows):
    """The MLP's output and ``dx`` are the unpatched peft model's but for rare one-ulp flips
    (:func:`lora_helpers.assert_rounding_twin`), and every gradient upstream of them (``pre``'s
    adapter, ``x``) and of the MLP's adapters is within the twins' relative L2 bound.

    With gate and up rounded as two linears (before the fix) 47-52% of the MLP's ``dx`` elements
    differed from peft's (relative L2 3.6e-3 to 4.1e-3; bound 1.2e-3), and ``pre``'s gradients by
    3.5e-3 to 5.6e-3 (bound 1.5e-3). Now none differ but with an NF4 base and fp32 adapters (1.2%
    of ``dx``, relative L2 1.8e-4).

    Tiled with bf16 adapters, the MLP's own adapter gradients are sums of per-tile bf16 values
    (autograd accumulates each tile's into ``.grad``), so only the bf16 rule holds them."""
    pm = _model(torch.bfloat16, fp32_adapters, activation, nf4)
    ours, theirs, _, (ours_dx, theirs_dx) = _three_runs(pm, torch.bfloat16, activation, tile_rows)
    assert_rounding_twin(ours[0][0], theirs[0][0], "y")
    assert_rounding_twin(ours_dx, theirs_dx, "the MLP's dx")
    for name, a, t in zip(LABELS[1:], ours[1], theirs[1]):
        assert a.dtype == t.dtype, name
        if tile_rows and not fp32_adapters and name.startswith(NAMES[1:]):
            continue
        share, rel = rounding_twin_stats(a, t)  # downstream of the flips: one moves a whole row
        assert rel <= TWIN_GRAD_REL_L2, f"{name}: {share:.2%} differ, relative L2 {rel:.2e}"


@pytest.mark.parametrize("activation", ["swiglu", "geglu_tanh", "geglu"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_fp32_matches_peft_and_gold(activation, nf4):
    pm = _model(torch.float32, activation=activation, nf4=nf4)
    ours, theirs, gold, _ = _three_runs(pm, torch.float32, activation)
    for a, g, t in zip(ours[0] + ours[1], gold[0] + gold[1], theirs[0] + theirs[1]):
        assert_close_fp32(a, g)
        assert_close_fp32(a, t)


def test_base_bias_of_the_fused_linear():
    """A trained ``gate_up_proj`` bias ``[2F]`` gets one gradient, as peft's (fp32)."""
    pm = _model(torch.float32, bias=True)
    peft_fn, ours_fn, _, _ = _fns(pm, allow_bias=True)
    bias = layers(pm, NAMES)[1].base_layer.bias.requires_grad_(True)
    x, dys = _inputs(torch.float32)
    params = lora_params(layers(pm, NAMES)) + [bias]
    for a, t in zip(*(sum(run(fn, x, dys, params), []) for fn in (ours_fn, peft_fn))):
        assert_close_fp32(a, t)


# ----------------------------------------------------------------------------- which windows fuse


def _weights(out_f=2 * INTER, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LoraWeights((torch.randn(out_f, H, generator=g) * 0.1).bfloat16(),
                       (torch.randn(r, H, generator=g) * 0.1).requires_grad_(),
                       (torch.randn(out_f, r, generator=g) * 0.1).requires_grad_(), 2.0)


def test_which_windows_run_as_one_linear():
    from corept_kernels.lora.mlp import mlp_linears
    from corept_kernels.lora.weights import split_whole

    gu, down = _weights(), LoraWeights(torch.randn(H, INTER), torch.randn(4, INTER), torch.randn(H, 4), 1.0)
    gate, up = gu.row_split(2)
    assert gate.whole is gu and up.whole is gu and gu.whole is None
    lin = mlp_linears(gate, up, down)
    assert lin.front == (gu,) and lin.cols == (slice(0, INTER), slice(INTER, 2 * INTER)) and lin.down is down
    assert lin.linears == (gu, down)
    assert mlp_linears(up, gate, down).cols == (slice(INTER, 2 * INTER), slice(0, INTER))  # either order
    assert split_whole(gu.row_split([40, 30, 74])) == (gu, [slice(0, 40), slice(40, 70), slice(70, 144)])
    separate = [mlp_linears(*pair, down) for pair in (
        (LoraWeights(gu.weight[:INTER], gu.A, gu.B[:INTER], 2.0),
         LoraWeights(gu.weight[INTER:], gu.A, gu.B[INTER:], 2.0)),  # two linears
        (gate, _weights(seed=2).row_split(2)[1]),  # windows of two linears
        (gate, gate),  # not a cover
        (dataclasses.replace(gate, scaling=3.0), up),  # a changed copy is no longer a window
        gu.row_split([INTER, INTER // 2, INTER // 2])[:2],  # a partial cover
        up.row_split(2),  # windows of a window: they cover only part of their whole
    )]
    assert all(lin.cols is None and len(lin.front) == 2 for lin in separate)
    assert dataclasses.replace(gate).whole is None and "whole" not in repr(gate)


def test_fused_saves_no_more_than_the_windows_and_less_than_peft():
    """Saved: ``x``, the one ``[N, 2F]`` output, ``xa`` ``[N, r]`` and down's ``[N, r_d]`` (the
    windows as two linears also kept a second ``[N, r]``)."""
    pm = _model(torch.bfloat16)
    _, gu, down = (read_lora_weights(m) for m in layers(pm, NAMES))
    x = torch.randn(*TOKENS, H, dtype=torch.bfloat16)
    n = TOKENS[0] * TOKENS[1]
    fused = saved_activation_bytes(lambda xx: lora_mlp(xx, *gu.row_split(2), down), x, pm)
    assert fused == n * (H + 2 * INTER) * 2 + n * (8 + 4) * 4  # fp32 xa of gate_up (r 8) and down (r 4)
    mlp = pm.base_model.model.mlp
    assert fused < saved_activation_bytes(mlp, x, pm)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nf4_whole_weight_dequantized_once_per_pass(monkeypatch, compute_dtype):
    import bitsandbytes.functional as bnbF

    pm = _model(compute_dtype, nf4=True)
    _, gu, down = (read_lora_weights(m) for m in layers(pm, NAMES))
    calls = []
    real = bnbF.dequantize_4bit
    monkeypatch.setattr(bnbF, "dequantize_4bit",
                        lambda w, s, *a, **k: calls.append(tuple(s.shape)) or real(w, s, *a, **k))
    x = torch.randn(*TOKENS, H, dtype=compute_dtype, requires_grad=True)
    y = lora_mlp(x, *gu.row_split(2), down)
    assert calls == [(2 * INTER, H), (H, INTER)], calls
    calls.clear()
    y.float().sum().backward()
    assert sorted(calls) == sorted([(2 * INTER, H), (H, INTER)]), calls


def test_partial_grads_and_second_backward_fails_loudly():
    pm = _model(torch.float32)
    mods = layers(pm, NAMES)
    _, gu, down = (read_lora_weights(m) for m in mods)
    for p in lora_params(mods[:2]):
        p.requires_grad_(False)  # only down trains, x needs no grad: h is recomputed from the halves
    x, dy = _inputs(torch.float32)
    theirs = run(pm.base_model.model.mlp, x, dy, lora_params(mods[2:]))[1][1:]
    for p in lora_params(mods[2:]):
        p.grad = None
    lora_mlp(x, *gu.row_split(2), down).backward(dy[0])
    for p, t in zip(lora_params(mods[2:]), theirs):
        assert_close_fp32(p.grad, t)
    for p in lora_params(mods[:2]):
        p.requires_grad_(True)
    y = lora_mlp(x.clone().requires_grad_(), *gu.row_split(2), down)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()  # the GLU backward overwrote the saved [N, 2F] output in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["swiglu", "geglu_tanh", "geglu"])
def test_glu_kernels_on_column_halves(activation, dtype):
    """The gated activation's kernels read (and the backward overwrites) the two column halves of
    one ``[N, 2F]`` buffer exactly as they do contiguous ``[N, F]`` tensors, and touch nothing else."""
    from corept_kernels.capabilities import get

    g = torch.Generator().manual_seed(0)
    y, dh = torch.randn(26, 2 * INTER, generator=g).to(dtype), torch.randn(26, INTER, generator=g).to(dtype)
    e, u = y[:, :INTER], y[:, INTER:]
    for which in ("triton_fn", "reference_fn"):
        fwd, bwd = getattr(get("lora_glu"), which), getattr(get("lora_glu_backward"), which)
        h = fwd(e, u, activation)
        assert h.is_contiguous() and torch.equal(h, fwd(e.contiguous(), u.contiguous(), activation)), which
        want = [t.clone() for t in (dh, e.contiguous(), u.contiguous())]
        bwd(*want, activation)
        buf, dh2 = torch.cat([y, torch.full((26, 3), 7.0, dtype=dtype)], 1), dh.clone()  # + 3 guard columns
        bwd(dh2, buf[:, :INTER], buf[:, INTER:2 * INTER], activation)
        assert torch.equal(dh2, want[0]) and torch.equal(buf[:, :2 * INTER], torch.cat(want[1:], 1)), which
        assert (buf[:, 2 * INTER:] == 7.0).all(), which
