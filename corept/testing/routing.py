"""Mixture-of-experts routing pinned to the fp32 gold copy's in the suite's bf16 comparisons.

A router picks each token's top-k experts: a discrete choice. Where two experts' logits nearly tie
(closer than bf16's rounding noise, ~1e-3), a bf16 model may pick the other one, and that token's
output and every gradient upstream of it then differ by O(1), whichever model rounds. The bf16 rule
(twice the unpatched bf16 model's error against the fp32 gold) measures rounding; a flip in one
model and not in the other turns it into a coin toss. So in bf16 checks of a model with experts,
the gold copy runs first and records each experts module's ``top_k_index`` per call shape; the
patched and the reference bf16 models then route every token to the gold's experts (their own
routing weights, router logits and router gradients are kept: only the choice is pinned).

The experts module's call, ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``, is
hooked where the MoE block calls it: the experts module itself, or the outermost peft
``ParamWrapper`` around it (LoRA on experts).
"""
from __future__ import annotations

import contextlib

import torch.nn as nn

from corept.lora.param_wrappers import wrapper_chain


def experts_calls(model: nn.Module, classes) -> dict[str, nn.Module]:
    """``{path without peft's prefixes: module the MoE block calls}`` for the experts of ``classes``."""
    out = {}
    for name, m in model.named_modules():
        if name.endswith(".base_layer") or type(wrapper_chain(m)[1]).__name__ not in set(classes):
            continue
        key = name.removeprefix("base_model.model.")
        out.setdefault(key, m)
    return out


@contextlib.contextmanager
def recorded(model: nn.Module, classes):
    """Record ``{(path, T): top_k_index}`` of ``model``'s experts calls (the first call per shape)."""
    routes, handles = {}, []
    for key, m in experts_calls(model, classes).items():
        def hook(_mod, args, key=key):
            routes.setdefault((key, tuple(args[1].shape)), args[1].detach().clone())
        handles.append(m.register_forward_pre_hook(hook))
    try:
        yield routes
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def pinned(model: nn.Module, classes, routes: dict):
    """Route ``model``'s experts calls to ``routes`` (from :func:`recorded`) where the shapes match."""
    handles = []
    for key, m in experts_calls(model, classes).items():
        def hook(_mod, args, key=key):
            index = routes.get((key, tuple(args[1].shape)))
            if index is None or len(args) != 3:
                return None
            return (args[0], index.to(args[1].device), args[2])
        handles.append(m.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
