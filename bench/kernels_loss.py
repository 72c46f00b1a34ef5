"""Losses: cross_entropy and fused_linear_cross_entropy vs torch, torch.compile and Liger-Kernel.

Shapes (bf16): Llama-3.1-8B (hidden 4096, vocab 128256) at 4x2048 and 1x16384 tokens, and the
Gemma-3 vocabulary (262144, hidden 3840) at 4x2048 tokens. The "torch" reference is HF's path:
``logits = hidden @ W.T`` in bf16, then ``F.cross_entropy(logits.float(), labels)``. The fused
linear CE runs with a trainable lm_head (full fine-tuning) and a frozen one (LoRA); about 5% of
the labels are ``-100``. Liger (``liger_kernel.ops``) is added when it imports; its autograd
functions are called positionally, so their ``forward`` signature is read at run time and only
the parameters that exist are passed (defaults for the rest).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from bench.common import BenchCase

LLAMA = (4096, 128256)
GEMMA3 = (3840, 262144)
SHAPES = [("llama-3.1-8b", 4, 2048, *LLAMA), ("llama-3.1-8b", 1, 16384, *LLAMA),
          ("gemma-3", 4, 2048, *GEMMA3)]


def _labels(n: int, vocab: int, device) -> torch.Tensor:
    y = torch.randint(0, vocab, (n,), device=device)
    y[torch.rand(n, device=device) < 0.05] = -100
    return y


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _liger(module: str, cls: str, values: dict):
    """``cls.apply`` bound positionally to ``values`` (by parameter name) or None if unavailable."""
    try:
        fn = getattr(__import__(module, fromlist=[cls]), cls)
    except Exception:  # noqa: BLE001 - liger absent or renamed: no liger column
        return None
    args = []
    for p in list(inspect.signature(fn.forward).parameters.values())[1:]:  # drop ctx
        if p.name in values:
            args.append(values[p.name])
        elif p.default is not inspect.Parameter.empty:
            args.append(p.default)
        else:
            print(f"liger {cls}: no value for required parameter {p.name!r}; skipped")
            return None
    return lambda: _first(fn.apply(*args))


def _torch_ce(logits, labels):
    return F.cross_entropy(logits.float(), labels)


def _torch_flce(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels)


def _ce_case(name, b, t, hidden, vocab, device) -> BenchCase:
    from corept_kernels import cross_entropy

    n = b * t
    logits = (torch.randn(n, vocab, device=device, dtype=torch.bfloat16) * 2).requires_grad_(True)
    labels = _labels(n, vocab, device)
    compiled = torch.compile(_torch_ce, dynamic=False)
    impls = {
        "corept": lambda: cross_entropy(logits, labels),
        "torch": lambda: _torch_ce(logits, labels),
        "torch_compile": lambda: compiled(logits, labels),
    }
    liger = _liger("liger_kernel.ops.cross_entropy", "LigerCrossEntropyFunction",
                   {"_input": logits, "input": logits, "target": labels, "weight": None,
                    "ignore_index": -100, "reduction": "mean"})
    if liger is not None:
        # note: Liger writes its gradient into the logits buffer during forward (timing unaffected)
        impls["liger"] = liger
    nbytes = n * vocab * 2
    return BenchCase(kernel="cross_entropy", shape=f"{name} {b}x{t}x{vocab} bf16", impls=impls,
                     bytes_fwd=nbytes, bytes_fwd_bwd=2 * nbytes, grad_inputs=[logits],
                     memory_bound=True)


def _flce_case(name, b, t, hidden, vocab, device, weights: dict, frozen: bool) -> BenchCase:
    from corept_kernels import fused_linear_cross_entropy

    n = b * t
    if (hidden, vocab) not in weights:
        weights[(hidden, vocab)] = torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16) * 0.02
    weight = weights[(hidden, vocab)].detach().requires_grad_(not frozen)
    h = torch.randn(n, hidden, device=device, dtype=torch.bfloat16).requires_grad_(True)
    labels = _labels(n, vocab, device)
    compiled = torch.compile(_torch_flce, dynamic=False)
    impls = {
        "corept": lambda: fused_linear_cross_entropy(h, weight, labels),
        "torch": lambda: _torch_flce(h, weight, labels),
        "torch_compile": lambda: compiled(h, weight, labels),
    }
    liger = _liger("liger_kernel.ops.fused_linear_cross_entropy",
                   "LigerFusedLinearCrossEntropyFunction",
                   {"_input": h, "input": h, "weight": weight, "target": labels, "bias": None,
                    "ignore_index": -100, "reduction": "mean"})
    if not frozen:  # the speed/memory trade of a trained lm_head: half the fp32 grad_weight passes
        impls["corept_chunk4096"] = lambda: fused_linear_cross_entropy(h, weight, labels, chunk_size=4096)
    if liger is not None:
        impls["liger"] = liger
    what = "lm_head frozen (LoRA)" if frozen else "lm_head trained"
    return BenchCase(kernel="fused_linear_cross_entropy",
                     shape=f"{name} {b}x{t}x{hidden}->{vocab} bf16, {what}", impls=impls,
                     grad_inputs=[h] if frozen else [h, weight])


def cases(device) -> list[BenchCase]:
    """Every loss case at every shape on ``device`` (CUDA)."""
    out = [_ce_case(*shape, device) for shape in SHAPES]
    weights: dict = {}
    for shape in SHAPES:
        for frozen in (False, True):
            out.append(_flce_case(*shape, device, weights, frozen))
    return out
