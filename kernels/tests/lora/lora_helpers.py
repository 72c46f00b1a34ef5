"""Shared pieces of the LoRA kernel tests: tiny peft-wrapped modules and corept/peft/gold runners.

Tiny odd shapes: hidden 40, intermediate 72, r 8 (r 4 on down_proj and k_proj), GQA q 48 vs k/v
24, 2x13 tokens; the fused kinds (``gate_up``: one ``gate_up_proj`` ``[2 * 72, 40]``, ``qkv_fused``:
one ``qkv_proj`` ``[48 + 2 * 24, 40]``) run corept on row windows of their one adapter. Every peft
model gets a random (non-zero) lora_B, and its bitsandbytes 4-bit modules have
``support_avx512bf16_for_cpu = False`` (else eval forwards repack the weights and gradients silently
break on AVX512-BF16 CPUs).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from corept_kernels.lora import LoraWeights, lora_mlp, lora_o, lora_qkv, lora_weights_from_peft
from corept_kernels.torch_ref import lora as ref

H, INTER, HQ, HKV, TOKENS = 40, 72, 48, 24, (2, 13)
ACT_FN = {"swiglu": F.silu, "geglu_tanh": partial(F.gelu, approximate="tanh"), "geglu": F.gelu}
MLP = ("gate_proj", "up_proj", "down_proj")
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_up_proj", "down_proj")
TARGETS = {"mlp": MLP, "qkv": QKV, "o": ("o_proj",), "gate_up": GATE_UP, "qkv_fused": ("qkv_proj",)}
OUT_WIDTHS = {"mlp": (H,), "qkv": (HQ, HKV, HKV), "o": (H,), "gate_up": (H,), "qkv_fused": (HQ, HKV, HKV)}

TWIN_MISMATCH, TWIN_REL_L2, TWIN_GRAD_REL_L2 = 0.08, 1.2e-3, 1.5e-3
"""Bounds for bf16 results that round at the reference's points from values equal to fp32
precision (``corept_kernels.lora.branch``): occasional one-ulp flips, propagated downstream (a flip
in the MLP's ``dh`` moves every element of its ``dx`` row a little). Measured on the tiny cases
over 8 seeds: at most 2.7% of elements differ, relative L2 at most 7.0e-4 (fp32 adapter grads:
6.2e-4). With the ``lo`` parts dropped or the branch rounded before the add: 21-66% differ,
relative L2 at least 2.0e-3 (adapter grads, ``lo`` dropped: at least 2.3e-3)."""


def rounding_twin_stats(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(share of elements that differ, relative L2 difference) of two same-dtype tensors."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    a, b = ours.float(), ref.float()
    return (ours != ref).float().mean().item(), ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_rounding_twin(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """``ours`` rounds like ``ref`` (see :data:`TWIN_MISMATCH`): few, small differences."""
    share, rel = rounding_twin_stats(ours, ref)
    assert share <= TWIN_MISMATCH and rel <= TWIN_REL_L2, f"{what}: {share:.2%} differ, relative L2 {rel:.2e}"


class TinyMLP(nn.Module):
    def __init__(self, activation: str = "swiglu", bias: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(H, INTER, bias=bias), nn.Linear(H, INTER, bias=bias)
        self.down_proj, self.act = nn.Linear(INTER, H, bias=bias), ACT_FN[activation]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TinyFusedMLP(nn.Module):
    """One ``gate_up_proj`` whose output halves are gate and up (e.g. Phi-3's MLP), then down."""

    def __init__(self, activation: str = "swiglu"):
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Linear(H, 2 * INTER, bias=False), nn.Linear(INTER, H, bias=False)
        self.act = ACT_FN[activation]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(self.act(gate) * up)


class TinyFusedQKV(nn.Module):
    """One ``qkv_proj`` whose output is split into q, k and v (e.g. Phi-3's attention)."""

    def __init__(self):
        super().__init__()
        self.qkv_proj = nn.Linear(H, HQ + 2 * HKV, bias=False)

    def forward(self, x):
        return tuple(self.qkv_proj(x).split([HQ, HKV, HKV], -1))


class TinyAttnProj(nn.Module):
    """q/k/v (GQA: k, v narrower than q) and o; forward returns q, k, v (o is called directly)."""

    def __init__(self, bias: bool = False):
        super().__init__()
        self.q_proj, self.o_proj = nn.Linear(H, HQ, bias=bias), nn.Linear(HQ, H, bias=False)
        self.k_proj, self.v_proj = nn.Linear(H, HKV, bias=bias), nn.Linear(H, HKV, bias=bias)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def quantize_nf4(model: nn.Module, names, compute_dtype: torch.dtype) -> nn.Module:
    """Replace ``names`` by bitsandbytes Linear4bit (nf4, double quant) holding the same weights."""
    import bitsandbytes as bnb

    for name in names:
        lin = getattr(model, name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to(compute_dtype).clone(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
        setattr(model, name, q.to("cpu"))  # .to() quantizes
    model.is_loaded_in_4bit = True
    return model


def peftify(model: nn.Module, targets, *, fp32_adapters: bool = True, **cfg):
    """peft LoRA on ``targets`` with random (non-zero) lora_B; 4-bit modules kept off the CPU repack."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), lora_dropout=cfg.pop("lora_dropout", 0.0),
                        rank_pattern={n: 4 for n in ("down_proj", "k_proj") if n in targets}, **cfg)
    pm = get_peft_model(model, config, autocast_adapter_dtype=fp32_adapters)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in targets:
            for B in getattr(pm.base_model.model, name).lora_B.values():
                B.weight.copy_(torch.randn(B.weight.shape, generator=gen) * 0.1)
    for m in pm.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False  # see notes/environment.md: else grads silently break
    return pm


def layers(pm, names):
    return [getattr(pm.base_model.model, n) for n in names]


def lora_params(mods):
    return [p for m in mods for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]


def run(fn, x, dys, params):
    """Forward ``fn(x)`` and backward ``dys``: (outputs, [x.grad, *param grads])."""
    x = x.detach().clone().requires_grad_(True)
    for p in params:
        p.grad = None
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [d.to(o.dtype) for o, d in zip(outs, dys)])
    return [o.detach() for o in outs], [x.grad] + [p.grad.clone() for p in params]


def gold_weights(mods):
    """float64 copies (dequantized for 4-bit) of the peft layers' weights, A/B as fresh leaves."""
    gold = []
    for m in mods:
        lw = lora_weights_from_peft(m, allow_bias=True)
        gold.append(LoraWeights(lw.dense_weight(torch.float64), lw.A.detach().double().requires_grad_(),
                                lw.B.detach().double().requires_grad_(), lw.scaling,
                                None if lw.bias is None else lw.bias.detach().double()))
    return gold


def _windows(kind, lws):
    """The fused kinds' weights as corept takes them: the one adapter's row windows."""
    if kind == "gate_up":
        return (*lws[0].row_split([INTER, INTER]), lws[1])
    return tuple(lws[0].row_split([HQ, HKV, HKV]))


def case(kind, pm, activation="swiglu", tile_rows=None):
    """(peft fn, corept fn, twin fn taking (x, weights), lora modules) for ``kind`` in :data:`TARGETS`."""
    if kind in ("gate_up", "qkv_fused"):
        mods = layers(pm, TARGETS[kind])
        lws = [lora_weights_from_peft(m) for m in mods]
        if kind == "qkv_fused":
            return (pm, lambda x: lora_qkv(x, *_windows(kind, lws)),
                    lambda x, g: ref.lora_qkv(x, *_windows(kind, g)), mods)
        return (pm, lambda x: lora_mlp(x, *_windows(kind, lws), activation=activation, tile_rows=tile_rows),
                lambda x, g: ref.lora_mlp(x, *_windows(kind, g), activation=activation), mods)
    if kind == "mlp":
        mods = layers(pm, MLP)
        lws = [lora_weights_from_peft(m) for m in mods]
        return (pm, lambda x: lora_mlp(x, *lws, activation=activation, tile_rows=tile_rows),
                lambda x, g: ref.lora_mlp(x, *g, activation=activation), mods)
    if kind == "qkv":
        mods = layers(pm, QKV)
        lws = [lora_weights_from_peft(m) for m in mods]
        return pm, lambda x: lora_qkv(x, *lws), lambda x, g: ref.lora_qkv(x, *g), mods
    mods = layers(pm, ("o_proj",))
    lw = lora_weights_from_peft(mods[0])
    return mods[0], lambda x: lora_o(x, lw), lambda x, g: ref.lora_o(x, g[0]), mods


def compare(kind, pm, dtype, activation="swiglu", x_noncontig=False, peft_adapter_dtype=None, tile_rows=None):
    """Run corept, a float64 gold and peft (and the torch twin at ``dtype``).

    :returns: ``(peft, corept, gold, labels, twin)``, each result ``(outputs, [x.grad, A/B grads])``.

    ``peft_adapter_dtype``: cast the adapters to it before peft's run (after the other two).
    """
    peft_fn, ours_fn, gold_fn, mods = case(kind, pm, activation, tile_rows)
    width = HQ if kind == "o" else H
    x = torch.randn(TOKENS[1], TOKENS[0], width).transpose(0, 1) if x_noncontig else torch.randn(*TOKENS, width)
    x = x.to(dtype)
    dys = [torch.randn(*TOKENS, w).to(dtype) for w in OUT_WIDTHS[kind]]
    params = lora_params(mods)
    ours_res = run(ours_fn, x, dys, params)
    lws = [lora_weights_from_peft(m) for m in mods]
    twin_res = run(lambda xx: gold_fn(xx, lws), x, dys, params)
    gold = gold_weights(mods)
    gold_res = run(lambda xx: gold_fn(xx, gold), x.double(), [d.double() for d in dys],
                   [t for lw in gold for t in (lw.A, lw.B)])
    if peft_adapter_dtype is not None:
        for p in params:
            p.data = p.data.to(peft_adapter_dtype)
    peft_res = run(peft_fn, x, dys, params)
    labels = ["x.grad"] + [f"{n}.{ab}.grad" for n in TARGETS[kind] for ab in ("A", "B")]
    return peft_res, ours_res, gold_res, labels, twin_res


def pairs(res_a, res_b):
    return list(zip(res_a[0] + res_a[1], res_b[0] + res_b[1]))


def triples(labels, ours, gold, theirs):
    """(name, corept, gold, peft) for every output and gradient."""
    names = [f"out{i}" for i in range(len(ours[0]))] + labels
    return zip(names, ours[0] + ours[1], gold[0] + gold[1], theirs[0] + theirs[1])


def tiny(kind, activation=None):
    """(model, LoRA targets) for ``kind`` in :data:`TARGETS`."""
    if kind == "mlp":
        return TinyMLP(activation or "swiglu"), MLP
    if kind == "gate_up":
        return TinyFusedMLP(activation or "swiglu"), GATE_UP
    if kind == "qkv_fused":
        return TinyFusedQKV(), TARGETS[kind]
    return TinyAttnProj(), QKV + ("o_proj",)


def saved_activation_bytes(fn, x, module: nn.Module) -> int:
    """Bytes of distinct storages autograd saves for backward during ``fn(x)``, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}  # storage address -> (bytes, tensor): tensors kept alive, so no address is reused

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.detach().clone().requires_grad_(True))
    return sum(n for n, _ in seen.values())


def assert_matches_gold_and_peft(compute_dtype, labels, ours_res, gold_res, peft_res) -> None:
    """fp32: tight against the float64 gold and peft; bf16: within 2x peft's error (+1 ulp)."""
    from tolerances import assert_close_fp32, assert_low_precision_ok

    for name, ours, gold, theirs in triples(labels, ours_res, gold_res, peft_res):
        if compute_dtype == torch.float32:
            assert_close_fp32(ours, gold)
            assert_close_fp32(ours, theirs)
        else:
            assert_low_precision_ok(ours, gold, theirs, name)
