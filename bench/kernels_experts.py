"""Grouped expert GEMM with LoRA (``expert_linear``) vs a per-expert loop and peft's merged weight.

A case module of ``bench/kernels.py`` (listed in its ``CASE_MODULES``), which times, checks and
writes it with the other kernels. On the GPU machine, from the repo root:
    python bench/kernels.py --only experts_gate_up,experts_down,experts_gate_up_t_bias,experts_wide [--impls corept,peft]
Forward and forward+backward in bf16, base weights frozen, LoRA r 16 on every expert. Implementations:

* ``corept``: :func:`corept_kernels.expert_linear` as dispatched (``torch._grouped_mm`` for the
  aligned bf16 GEMMs on sm90/sm100, Triton for the rest);
* ``corept_triton``: the same forward and backward with every GEMM on the Triton kernels;
* ``torch``: a loop over experts with ``torch.matmul`` (base plus ``lora_B(lora_A(x)) * scaling``),
  the reference the errors are measured against;
* ``peft``: peft's ``ParamWrapper`` route: ``W + scaling * B @ A`` materialised with one ``baddbmm``
  (its ``_LoraFactorsProxy``), then the loop over experts;
* ``peft_grouped_mm``: the same materialised weight through ``torch._grouped_mm`` (transformers'
  grouped experts path under peft).

Shapes (tokens x top-k rows, sorted by expert, routed by top-k of random logits): 128 experts of
2048 -> 1536 (gate/up) and 768 -> 2048 (down), 8192 tokens top-8 (Qwen3-30B-A3B's experts);
32 experts of 2880 -> 5760 in the transposed layout with bias, 4096 tokens top-4 (gpt-oss-20b);
8 experts of 4096 -> 14336, 4096 tokens top-2 (Mixtral-8x7B's gate).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import BenchCase  # noqa: E402

RANK, SCALING = 16, 2.0
# name, experts, in, out, tokens, top-k, transposed, bias
SHAPES = [
    ("experts_gate_up", 128, 2048, 1536, 8192, 8, False, False),
    ("experts_down", 128, 768, 2048, 8192, 8, False, False),
    ("experts_gate_up_t_bias", 32, 2880, 5760, 4096, 4, True, True),
    ("experts_wide", 8, 4096, 14336, 4096, 2, False, False),
]


def _routing(tokens: int, experts: int, top_k: int, device) -> torch.Tensor:
    """``[E]`` int32 cumulative end offsets of ``tokens * top_k`` rows routed by top-k of random
    logits (with a per-expert bias, so experts get uneven loads as routers give them)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(tokens, experts, generator=gen) + torch.randn(experts, generator=gen)
    chosen = logits.topk(top_k, dim=-1).indices.flatten()
    return torch.bincount(chosen, minlength=experts).cumsum(0).to(torch.int32).to(device)


@contextlib.contextmanager
def _triton_only():
    from corept_kernels import grouped_gemm

    before = grouped_gemm.TORCH_GROUPED_MM
    grouped_gemm.TORCH_GROUPED_MM = False
    try:
        yield
    finally:
        grouped_gemm.TORCH_GROUPED_MM = before


class _TritonOnly(torch.autograd.Function):
    """``expert_linear``'s own forward and backward with every GEMM on the Triton kernels."""

    @staticmethod
    def forward(ctx, x, offsets, weight, lora_a, lora_b, bias, transposed):
        from corept_kernels.ops.experts import expert_linear_forward

        with _triton_only():
            y, xa = expert_linear_forward(x, offsets, weight, lora_a, lora_b, bias, SCALING, transposed)
        ctx.transposed = transposed
        ctx.save_for_backward(x, offsets, weight, lora_a, lora_b, xa)
        return y

    @staticmethod
    def backward(ctx, dy):
        from corept_kernels.ops.experts import expert_linear_backward

        x, offsets, weight, lora_a, lora_b, xa = ctx.saved_tensors
        with _triton_only():
            dx, _, da, db, _ = expert_linear_backward(dy, x, offsets, weight, lora_a, lora_b, xa, SCALING,
                                                      ctx.transposed, True, False, True, True, False)
        return dx, None, None, da, db, None, None


def _loop(x, offsets, weights, bias, transposed):
    """``y_e = x_e @ W_e`` (+ bias) for per-expert weights in the layer's layout."""
    outs, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        w = weights[e] if transposed else weights[e].t()
        y = x[start:end] @ w
        outs.append(y if bias is None else y + bias[e])
        start = end
    return torch.cat(outs)


def _merged(weight, lora_a, lora_b, transposed):
    """peft's ``_LoraFactorsProxy``: ``W + scaling * lhs @ rhs`` in one ``baddbmm``."""
    if transposed:
        return torch.baddbmm(weight, lora_a.transpose(1, 2), lora_b.transpose(1, 2), alpha=SCALING)
    return torch.baddbmm(weight, lora_b, lora_a, alpha=SCALING)


def _case(device, name, E, K, M, tokens, top_k, transposed, with_bias) -> BenchCase:
    from corept_kernels import expert_linear
    from corept_kernels.ops.experts import expert_linear_reference

    dt = torch.bfloat16
    offsets = _routing(tokens, E, top_k, device)
    n = tokens * top_k
    x = torch.randn(n, K, device=device, dtype=dt).requires_grad_(True)
    weight = (torch.randn((E, K, M) if transposed else (E, M, K), device=device, dtype=dt) / K ** 0.5)
    lora_a = (torch.randn(E, RANK, K, device=device, dtype=dt) / K ** 0.5).requires_grad_(True)
    lora_b = (torch.randn(E, M, RANK, device=device, dtype=dt) * 0.01).requires_grad_(True)
    bias = torch.randn(E, M, device=device, dtype=dt) if with_bias else None

    def peft_grouped_mm():
        w = _merged(weight, lora_a, lora_b, transposed)
        y = torch._grouped_mm(x, w if transposed else w.transpose(1, 2), offs=offsets)
        if bias is not None:
            ids = torch.searchsorted(offsets, torch.arange(n, device=device, dtype=torch.int32), right=True)
            y = y + bias[ids.clamp_(max=E - 1)]
        return y

    impls = {
        "corept": lambda: expert_linear(x, offsets, weight, lora_a, lora_b, SCALING, bias, transposed),
        "corept_triton": lambda: _TritonOnly.apply(x, offsets, weight, lora_a, lora_b, bias, transposed),
        "torch": lambda: expert_linear_reference(x, offsets, weight, lora_a, lora_b, SCALING, bias, transposed),
        "peft": lambda: _loop(x, offsets, _merged(weight, lora_a, lora_b, transposed), bias, transposed),
    }
    if hasattr(torch, "_grouped_mm"):
        impls["peft_grouped_mm"] = peft_grouped_mm
    layout = "[E,K,M]" if transposed else "[E,M,K]"
    return BenchCase(kernel=name, shape=f"E{E} {K}->{M} {layout}{' +bias' if with_bias else ''} {tokens}x top{top_k} "
                                        f"r{RANK} bf16", impls=impls, grad_inputs=[x, lora_a, lora_b])


def cases(device) -> list[BenchCase]:
    """One case per entry of :data:`SHAPES`, fwd+bwd, frozen base."""
    return [_case(device, *shape) for shape in SHAPES]
