"""The built-in plugin ``corept.components``: the shared components answer every hook, last.

Loaded by the plugin manager like any plugin (``corept.registry.manager.BUILTIN_PLUGINS``). Its
implementations are ``trylast``: a plugin's own answer, or a third party's ``tryfirst`` one, comes
first. Each answers a :class:`~corept.Replacement` when the module has the shape the shared
component needs and its math is proven equal on a probe, else a :class:`~corept.Keep` naming the
cause. The component modules import ``corept_kernels``, so they are imported on first use, not
when plugins load (the Triton mode must be fixed before the kernels are: ``TRITON_INTERPRET``).
"""
from __future__ import annotations

import importlib

from corept.patching.answers import Keep
from corept.registry.hookspecs import hookimpl


def _component(name: str):
    return importlib.import_module(f"corept.components.{name}")


@hookimpl(trylast=True)
def corept_patch_norm(arch, module, model):
    return _component("norm").norm_replacement(arch, module, model)


@hookimpl(trylast=True)
def corept_patch_mlp(arch, module, model):
    return _component("mlp").mlp_replacement(arch, module, model)


@hookimpl(trylast=True)
def corept_patch_rope(arch, module, model):
    return _component("rope").rope_replacement(arch, module, model)


@hookimpl(trylast=True)
def corept_patch_loss(arch, module, model):
    return _component("head").causal_lm_replacement(arch, module, model)


@hookimpl(trylast=True)
def corept_patch_lora(arch, module, model):
    return _component("lora").lora_replacement(arch, module, model)


@hookimpl(trylast=True)
def corept_patch_attention(arch, module, model):
    # corept ships no attention kernel: transformers' AttentionInterface runs (SDPA dispatches to
    # flash kernels on CUDA; the implementation a quirk forces at load otherwise)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return Keep(f"attention runs transformers' AttentionInterface {impl!r} (corept has no attention kernel)")
