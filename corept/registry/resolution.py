"""Resolve once: the architecture of one model config, with its quirks read from that config.

:func:`resolve` is the only place a ``model_type`` is looked up. ``corept.patch`` stores the result
in the model's patch state, and every later step (LoRA setup, checkpointing, FSDP, saving, the
report) reads it from there (:func:`corept.patching.architecture_of`); the planner and ``corept
inspect``, which have a config but no model, call :func:`resolve` themselves.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from corept.errors import UnsupportedArchitectureError
from corept.registry.declarations import Architecture, ModuleRoles, Projections
from corept.registry.quirks import LoadPolicy, Numerics, Recorded
from corept.versions import transformers_supported

logger = logging.getLogger("corept")


@dataclass(frozen=True, eq=False)
class ResolvedArchitecture:
    """An :class:`~corept.registry.declarations.Architecture` bound to one model config.

    :param declaration: what the plugin declared (its ``FromConfig`` values unresolved).
    :param plugin: name of the plugin owning it; :param distribution: the distribution shipping it.
    :param config: the model's text config (``config.get_text_config()``).
    :param load: :param numerics: :param recorded: the declaration's quirk groups, resolved.
    :param supported: the installed transformers is inside ``declaration.transformers``;
        :param unsupported_reason: why not.
    :param probes: patch-time probe results, kept so each module class is probed once per model.
    """

    declaration: Architecture
    plugin: str
    distribution: str | None
    config: Any
    load: LoadPolicy
    numerics: Numerics
    recorded: Recorded
    supported: bool
    unsupported_reason: str = ""
    probes: dict = field(default_factory=dict, repr=False)

    @property
    def model_type(self) -> str:
        return self.declaration.model_type

    @property
    def roles(self) -> ModuleRoles:
        return self.declaration.roles

    @property
    def projections(self) -> Projections:
        return self.declaration.projections

    @property
    def components(self) -> tuple[str, ...]:
        return self.declaration.components

    @property
    def keep(self) -> dict[str, str]:
        return dict(self.declaration.keep)

    @property
    def lora_targets(self) -> tuple[str, ...] | None:
        return self.declaration.lora_targets

    @property
    def notes(self) -> str:
        return self.declaration.notes

    def quirks(self) -> dict:
        """Every resolved quirk, one flat dict (names are unique across the three groups); the
        recorded config fields appear under their own names, with how they are handled."""
        recorded = self.recorded.to_dict()
        return {**self.load.to_dict(), **self.numerics.to_dict(), **recorded.pop("config"), **recorded}

    def config_attrs(self) -> set[str]:
        """Config attributes the declaration reads or records (for the conformance kit)."""
        d = self.declaration
        return d.load.config_attrs() | d.numerics.config_attrs() | d.recorded.config_attrs()


def bind(declaration: Architecture, plugin: str, distribution: str | None, config: Any) -> ResolvedArchitecture:
    """Resolve ``declaration``'s quirks against ``config`` (a full or text config)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    ok, reason = transformers_supported(declaration.transformers)
    return ResolvedArchitecture(declaration, plugin, distribution, text, declaration.load.resolve(text),
                                declaration.numerics.resolve(text), declaration.recorded.resolve(text), ok, reason)


def unclaimed_message(model_type: str) -> str:
    from corept.registry.manager import get_plugin_manager

    pm = get_plugin_manager()
    installed = ", ".join(f"{r.name} ({', '.join(a.model_type for a in r.architectures)})"
                          for r in pm.records.values() if r.loaded and r.architectures) or "none"
    return (f"no corept plugin supports model_type {model_type!r}. Installed plugins: {installed}. "
            f"Install a plugin that declares it (pip install corept-<family>), or write one: "
            f"`corept new-plugin NAME` and docs/writing-a-plugin.md.")


def resolve(config: Any, *, strict: bool = False, warn: bool = True) -> ResolvedArchitecture | None:
    """The architecture owning ``config.model_type``, resolved against ``config``.

    :param strict: raise :class:`UnsupportedArchitectureError` when no plugin claims it.
    :param warn: log a warning when none does (and ``strict`` is off).
    :raises PluginConflictError: two plugins claim it with equal priority.
    """
    from corept.registry.manager import get_plugin_manager

    model_type = getattr(config, "model_type", None)
    found = get_plugin_manager().architecture_for(model_type)
    if found is None:
        msg = unclaimed_message(model_type)
        if strict:
            raise UnsupportedArchitectureError(msg)
        if warn:
            logger.warning("%s The model stays unpatched.", msg)
        return None
    arch, rec = found
    return bind(arch, rec.name, rec.distribution, config)
