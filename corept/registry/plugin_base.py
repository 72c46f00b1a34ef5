"""A ready-made plugin object for architecture plugins that are declarations.

An architecture plugin can be as small as::

    from corept import Architecture, ArchitecturePlugin, ModuleRoles
    plugin = ArchitecturePlugin([Architecture("myarch", ModuleRoles.standard("MyArch"))])

with ``[project.entry-points.corept] myarch = "corept_myarch:plugin"``. It registers the
architectures; corept's shared components (the built-in plugin ``corept.components``) then patch
them from the declarations. To customise one component, subclass and implement its hook::

    class MyPlugin(ArchitecturePlugin):
        @corept.hookimpl
        def corept_patch_mlp(self, arch, module, model):
            if not self.owns(arch):
                return None                       # not mine: let others answer
            return corept.Keep("MyArch's MLP has a bias the fused kernel lacks")

Returning ``None`` means "no opinion" (the shared component answers next); return
:class:`~corept.patching.answers.Keep` to keep transformers' implementation.
"""
from __future__ import annotations

from typing import Iterable

from corept.registry.declarations import Architecture
from corept.registry.hookspecs import hookimpl


class ArchitecturePlugin:
    """Registers ``architectures``; subclasses add component hooks for them."""

    def __init__(self, architectures: Iterable[Architecture]):
        self.architectures = list(architectures)

    def owns(self, arch) -> bool:
        """Whether ``arch`` (an :class:`Architecture` or a resolved one) is one of this plugin's own."""
        declaration = getattr(arch, "declaration", arch)
        return any(a is declaration for a in self.architectures)

    @hookimpl
    def corept_register_architectures(self) -> list[Architecture]:
        return list(self.architectures)
