"""Fused LoRA MLP / QKV / O vs peft's LoRA layers on the same weights, forward+backward.

Llama-3.1-8B shapes: hidden 4096, intermediate 14336, 32 heads / 8 kv heads of 128, r 16, bf16,
4x2048 tokens. Both implementations use the same base weights and the same bf16 adapters (peft
would default to fp32 adapters on a bf16 model, which only makes it slower). The MLP also runs
with one fused ``gate_up_proj`` ``[2 * 14336, 4096]`` (Phi-3's layout), given to ``lora_mlp`` as
its two row windows. The NF4 case (bitsandbytes Linear4bit, double quant, bf16 compute) is added
when bitsandbytes imports.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.common import BenchCase

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, RANK = 4096, 14336, 32, 8, 128, 16
BATCH, SEQ = 4, 2048


class _MLP(nn.Module):
    def __init__(self, device, dtype):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj, self.up_proj = nn.Linear(HIDDEN, INTER, **kw), nn.Linear(HIDDEN, INTER, **kw)
        self.down_proj = nn.Linear(INTER, HIDDEN, **kw)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _GateUpMLP(nn.Module):
    """One ``gate_up_proj`` whose output halves are gate and up, then ``down_proj``."""

    def __init__(self, device, dtype):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_up_proj, self.down_proj = nn.Linear(HIDDEN, 2 * INTER, **kw), nn.Linear(INTER, HIDDEN, **kw)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class _Attn(nn.Module):
    def __init__(self, device, dtype):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, **kw)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, **kw)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, **kw)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, **kw)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _nf4(model: nn.Module, names, device) -> nn.Module:
    import bitsandbytes as bnb

    for name in names:
        lin = getattr(model, name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
        setattr(model, name, q.to(device))  # quantized on the move
        del lin
    model.is_loaded_in_4bit = True
    return model


def _peftify(model: nn.Module, names, dtype):
    """peft LoRA (r 16, alpha 32, dropout 0) on ``names``; adapters in ``dtype``, lora_B random."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                          target_modules=list(names)), autocast_adapter_dtype=False)
    mods = [getattr(pm.base_model.model, n) for n in names]
    params = []
    with torch.no_grad():
        for m in mods:
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
            A.data = A.data.to(dtype)
            B.data = (torch.randn_like(B.data, dtype=torch.float32) * 0.01).to(dtype)
            params += [A, B]
    for m in pm.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return pm, mods, params


def _x(device, dtype, width):
    return torch.randn(BATCH, SEQ, width, device=device, dtype=dtype).requires_grad_(True)


def _mlp_case(device, dtype, nf4: bool, gate_up: bool = False) -> BenchCase:
    from corept_kernels.lora import lora_mlp, lora_weights_from_peft

    names = ("gate_up_proj", "down_proj") if gate_up else ("gate_proj", "up_proj", "down_proj")
    model = (_GateUpMLP if gate_up else _MLP)(device, dtype).requires_grad_(False)
    if nf4:
        model = _nf4(model, names, device)
    pm, mods, params = _peftify(model, names, dtype)
    lws = [lora_weights_from_peft(m) for m in mods]
    gate, up, down = (*lws[0].row_split(2), lws[1]) if gate_up else lws
    x = _x(device, dtype, HIDDEN)
    base = ("nf4 " if nf4 else "") + ("gate_up " if gate_up else "")
    return BenchCase(
        kernel="lora_mlp",
        shape=f"{BATCH}x{SEQ}x{HIDDEN} inter {INTER} r{RANK} {base}bf16",
        impls={"corept": lambda: lora_mlp(x, gate, up, down, "swiglu"), "peft": lambda: pm(x)},
        grad_inputs=[x, *params],
    )


def _attn_cases(device, dtype) -> list[BenchCase]:
    from corept_kernels.lora import lora_o, lora_qkv, lora_weights_from_peft

    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    pm, mods, params = _peftify(_Attn(device, dtype).requires_grad_(False), names, dtype)
    q, k, v, o = (lora_weights_from_peft(m) for m in mods)
    x = _x(device, dtype, HIDDEN)
    xo = _x(device, dtype, HEADS * HEAD_DIM)
    o_peft = mods[3]
    return [
        BenchCase(kernel="lora_qkv",
                  shape=f"{BATCH}x{SEQ}x{HIDDEN} q {HEADS}x{HEAD_DIM} kv {KV_HEADS}x{HEAD_DIM} r{RANK} bf16",
                  impls={"corept": lambda: lora_qkv(x, q, k, v), "peft": lambda: pm(x)},
                  grad_inputs=[x, *params[:6]]),
        BenchCase(kernel="lora_o", shape=f"{BATCH}x{SEQ}x{HEADS * HEAD_DIM} -> {HIDDEN} r{RANK} bf16",
                  impls={"corept": lambda: lora_o(xo, o), "peft": lambda: o_peft(xo)},
                  grad_inputs=[xo, *params[6:]]),
    ]


def cases(device) -> list[BenchCase]:
    """LoRA MLP (bf16 base, also with a fused gate_up, and NF4 base when bitsandbytes imports),
    QKV and O, fwd+bwd."""
    dtype = torch.bfloat16
    out = [_mlp_case(device, dtype, nf4=False), _mlp_case(device, dtype, nf4=False, gate_up=True),
           *_attn_cases(device, dtype)]
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - no bitsandbytes on this stack: skip the NF4 case
        return out
    out.append(_mlp_case(device, dtype, nf4=True))
    return out
