"""A ready-made plugin object for architecture plugins that are mostly declarations.

An architecture plugin can be as small as::

    from corept import Architecture, ArchitecturePlugin, ModuleRoles
    plugin = ArchitecturePlugin([Architecture("myarch", ModuleRoles.standard("MyArch"))])

with ``[project.entry-points.corept] myarch = "corept_myarch:plugin"``. It registers the
architectures and answers every component hook for *its own* model types with the shared
kernel-backed components. Subclass it and override one ``corept_patch_*`` method to customise a
component; return ``None`` from it to keep transformers' implementation.
"""
from __future__ import annotations

import importlib
from typing import Iterable

from corept.architecture import Architecture
from corept.hookspecs import hookimpl


def _components():
    # Imported on first patch, not at ``import corept``: corept.components imports corept_kernels,
    # whose @triton.jit decorators fix the Triton mode (GPU or TRITON_INTERPRET) when they run.
    # ``import corept`` happens early (e.g. pytest loads corept's pytest11 plugin before any
    # conftest could set TRITON_INTERPRET=1).
    return importlib.import_module("corept.components")


class ArchitecturePlugin:
    """Registers ``architectures`` and patches their components with corept's kernels."""

    def __init__(self, architectures: Iterable[Architecture]):
        self.architectures = list(architectures)
        self.model_types = frozenset(a.model_type for a in self.architectures)

    def owns(self, arch: Architecture) -> bool:
        """Whether ``arch`` is one of this plugin's own declarations."""
        return arch.model_type in self.model_types and any(a is arch for a in self.architectures)

    @hookimpl
    def corept_register_architectures(self) -> list[Architecture]:
        return list(self.architectures)

    @hookimpl
    def corept_patch_norm(self, arch, quirks, module, model):
        return _components().norm_replacement(arch, quirks, module, model) if self.owns(arch) else None

    @hookimpl
    def corept_patch_mlp(self, arch, quirks, module, model):
        return _components().mlp_replacement(arch, quirks, module, model) if self.owns(arch) else None

    @hookimpl
    def corept_patch_rope(self, arch, quirks, module, model):
        return _components().rope_replacement(arch, quirks, module, model) if self.owns(arch) else None

    @hookimpl
    def corept_patch_loss(self, arch, quirks, module, model):
        return _components().causal_lm_replacement(arch, quirks, module, model) if self.owns(arch) else None

    @hookimpl
    def corept_patch_attention(self, arch, quirks, module, model):
        # Attention stays on transformers' AttentionInterface (sdpa -> flash backend on CUDA, or the
        # implementation a quirk forces); corept ships no Triton attention kernel yet.
        return None
