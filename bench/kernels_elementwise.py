"""Norms, RoPE and gated activations: corept vs torch eager, torch.compile and Liger-Kernel.

Llama-3.1-8B shapes in bf16: hidden 4096, intermediate 14336, 32 query / 8 kv heads of 128, at
4x2048 and 1x16384 tokens. "torch" is the HF modeling code written out (LlamaRMSNorm,
GemmaRMSNorm, apply_rotary_pos_emb, ``act(gate) * up``); "torch_compile" compiles it. Every case
is memory bound; ``bytes_*`` count each tensor read or written once (the floor any kernel pays).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import BenchCase

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
TOKENS = [(4, 2048), (1, 16384)]
EPS = 1e-5
BF16 = 2  # bytes per element


def _liger(attr: str, module: str):
    """``liger_kernel.ops.<module>.<attr>``, or None when Liger (or that op) is missing."""
    try:
        mod = __import__(f"liger_kernel.ops.{module}", fromlist=[attr])
        return getattr(mod, attr)
    except Exception:  # noqa: BLE001 - not installed, or renamed in this version
        return None


def _leaf(shape, device, std=1.0, mean=0.0):
    t = torch.randn(shape, device=device, dtype=torch.bfloat16) * std + mean
    return t.requires_grad_(True)


# --- HF's torch code, written out -----------------------------------------------------------
def _torch_rms_llama(x, w):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def _torch_rms_gemma(x, w):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return (h * (1.0 + w.float())).type_as(x)


def _torch_layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _torch_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _torch_swiglu(g, u):
    return F.silu(g) * u


def _torch_geglu(g, u):
    return F.gelu(g, approximate="tanh") * u


# --- cases -----------------------------------------------------------------------------------
def _norm_cases(device) -> list[BenchCase]:
    from corept_kernels import layer_norm, rms_norm

    liger_rms = _liger("LigerRMSNormFunction", "rms_norm")
    liger_ln = _liger("LigerLayerNormFunction", "layer_norm")
    compiled = {f: torch.compile(f) for f in (_torch_rms_llama, _torch_rms_gemma, _torch_layer_norm)}
    out = []
    for b, s in TOKENS:
        m = b * s
        shape = f"{b}x{s}x{HIDDEN} bf16"
        rows_io = m * HIDDEN * BF16
        # (label and Liger's casting_mode, corept's casting, offset, torch twin); the label keeps
        # Liger's name so rows stay comparable with earlier results
        for liger_mode, casting, offset, torch_fn in (("llama", "scale_after_cast", 0.0, _torch_rms_llama),
                                                      ("gemma", "scale_in_fp32", 1.0, _torch_rms_gemma)):
            x = _leaf((b, s, HIDDEN), device)
            w = _leaf((HIDDEN,), device, 0.1, 1.0 - offset)
            impls = {
                "corept": lambda x=x, w=w, c=casting, o=offset: rms_norm(x, w, EPS, offset=o, casting=c),
                "torch": lambda x=x, w=w, f=torch_fn: f(x, w),
                "torch_compile": lambda x=x, w=w, f=compiled[torch_fn]: f(x, w),
            }
            if liger_rms is not None:
                impls["liger"] = lambda x=x, w=w, c=liger_mode, o=offset: liger_rms.apply(x, w, EPS, o, c)
            out.append(BenchCase(
                kernel="rms_norm", shape=f"{shape} {liger_mode}", impls=impls, grad_inputs=[x, w],
                bytes_fwd=2 * rows_io + HIDDEN * BF16,
                bytes_fwd_bwd=5 * rows_io + 3 * HIDDEN * BF16, memory_bound=True))
        x = _leaf((b, s, HIDDEN), device)
        w, bias = _leaf((HIDDEN,), device, 0.1, 1.0), _leaf((HIDDEN,), device, 0.1)
        impls = {
            "corept": lambda x=x, w=w, bias=bias: layer_norm(x, w, bias, EPS),
            "torch": lambda x=x, w=w, bias=bias: _torch_layer_norm(x, w, bias),
            "torch_compile": lambda x=x, w=w, bias=bias: compiled[_torch_layer_norm](x, w, bias),
        }
        if liger_ln is not None:
            impls["liger"] = lambda x=x, w=w, bias=bias: liger_ln.apply(x, w, bias, EPS)
        out.append(BenchCase(
            kernel="layer_norm", shape=shape, impls=impls, grad_inputs=[x, w, bias],
            bytes_fwd=2 * rows_io + 2 * HIDDEN * BF16,
            bytes_fwd_bwd=5 * rows_io + 5 * HIDDEN * BF16, memory_bound=True))
    return out


def _rope_cases(device) -> list[BenchCase]:
    from corept_kernels import rope

    liger_rope = _liger("LigerRopeFunction", "rope")
    compiled = torch.compile(_torch_rope)
    out = []
    for b, s in TOKENS:
        # HF layout: projections viewed as [B, S, H, D] and transposed to [B, H, S, D].
        qb, kb = _leaf((b, s, HEADS, HEAD_DIM), device), _leaf((b, s, KV_HEADS, HEAD_DIM), device)
        pos = torch.arange(s, device=device, dtype=torch.float32).expand(b, s)
        inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM)
        emb = (pos[..., None] * inv_freq).repeat(1, 1, 2)
        cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()  # HF returns them in the model dtype

        def qk(qb=qb, kb=kb):
            return qb.transpose(1, 2), kb.transpose(1, 2)

        impls = {
            "corept": lambda qk=qk, c=cos, sn=sin: rope(*qk(), c, sn),
            "torch": lambda qk=qk, c=cos, sn=sin: _torch_rope(*qk(), c, sn),
            "torch_compile": lambda qk=qk, c=cos, sn=sin: compiled(*qk(), c, sn),
        }
        if liger_rope is not None:
            impls["liger"] = lambda qk=qk, c=cos, sn=sin: liger_rope.apply(*qk(), c, sn)
        qk_bytes = b * s * (HEADS + KV_HEADS) * HEAD_DIM * BF16
        cs_bytes = 2 * b * s * HEAD_DIM * BF16
        out.append(BenchCase(
            kernel="rope", shape=f"{b}x{s} q {HEADS}x{HEAD_DIM} kv {KV_HEADS}x{HEAD_DIM} bf16",
            impls=impls, grad_inputs=[qb, kb], bytes_fwd=2 * qk_bytes + cs_bytes,
            bytes_fwd_bwd=4 * qk_bytes + 2 * cs_bytes, memory_bound=True))
    return out


def _glu_cases(device) -> list[BenchCase]:
    from corept_kernels import geglu, swiglu

    specs = [("swiglu", swiglu, _torch_swiglu, _liger("LigerSiLUMulFunction", "swiglu")),
             ("geglu", lambda g, u: geglu(g, u, "tanh"), _torch_geglu, _liger("LigerGELUMulFunction", "geglu"))]
    out = []
    for name, ours, torch_fn, liger_fn in specs:
        compiled = torch.compile(torch_fn)
        for b, s in TOKENS:
            g, u = _leaf((b, s, INTER), device), _leaf((b, s, INTER), device)
            impls = {
                "corept": lambda g=g, u=u, f=ours: f(g, u),
                "torch": lambda g=g, u=u, f=torch_fn: f(g, u),
                "torch_compile": lambda g=g, u=u, f=compiled: f(g, u),
            }
            if liger_fn is not None:
                impls["liger"] = lambda g=g, u=u, f=liger_fn: f.apply(g, u)
            n = b * s * INTER * BF16
            out.append(BenchCase(
                kernel=name, shape=f"{b}x{s}x{INTER} bf16{' tanh' if name == 'geglu' else ''}",
                impls=impls, grad_inputs=[g, u], bytes_fwd=3 * n, bytes_fwd_bwd=8 * n,
                memory_bound=True))
    return out


def cases(device) -> list[BenchCase]:
    """rms_norm (casting scale_after_cast and scale_in_fp32), layer_norm, rope, swiglu, geglu (tanh);
    fwd and fwd+bwd."""
    return [*_norm_cases(device), *_rope_cases(device), *_glu_cases(device)]
