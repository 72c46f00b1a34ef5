"""Built-in fallback plugin: answers every component hook last, for any declared architecture.

Registered by the plugin manager as ``corept.generic`` with ``trylast`` implementations, so an
architecture plugin that only *declares* an :class:`~corept.architecture.Architecture` still gets
the kernel-backed components, and any plugin's own implementation (or a third party's
``tryfirst`` one) takes precedence.
"""
from __future__ import annotations

import importlib

from corept.hookspecs import hookimpl


def _components():
    # imported on first patch, not when plugins load (see corept.plugin_base._components)
    return importlib.import_module("corept.components")


@hookimpl(trylast=True)
def corept_patch_norm(arch, quirks, module, model):
    return _components().norm_replacement(arch, quirks, module, model)


@hookimpl(trylast=True)
def corept_patch_mlp(arch, quirks, module, model):
    return _components().mlp_replacement(arch, quirks, module, model)


@hookimpl(trylast=True)
def corept_patch_rope(arch, quirks, module, model):
    return _components().rope_replacement(arch, quirks, module, model)


@hookimpl(trylast=True)
def corept_patch_loss(arch, quirks, module, model):
    return _components().causal_lm_replacement(arch, quirks, module, model)
