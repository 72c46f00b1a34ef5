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

from corept.registry.hookspecs import hookimpl


def _shared(module_name: str, factory: str):
    """A ``trylast`` hook implementation answering with ``corept.components.<module_name>.<factory>``
    (the module imported on the first call)."""

    @hookimpl(trylast=True)
    def answer(arch, module, model):
        return getattr(importlib.import_module(f"corept.components.{module_name}"), factory)(arch, module, model)

    return answer


corept_patch_norm = _shared("norm", "norm_replacement")
corept_patch_mlp = _shared("mlp", "mlp_replacement")
corept_patch_rope = _shared("rope", "rope_replacement")
corept_patch_loss = _shared("head", "causal_lm_replacement")
corept_patch_lora = _shared("lora", "lora_replacement")
corept_patch_attention = _shared("attention", "attention_replacement")
corept_patch_experts = _shared("experts", "experts_replacement")
