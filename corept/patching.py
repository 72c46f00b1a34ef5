"""Apply and undo patches on ONE model instance.

Nothing here touches a class, a transformers module global or a torch function: each change is an
instance attribute (a bound ``forward`` or a helper attribute), recorded with what it replaced so
:func:`unpatch` restores the instance exactly. Patching twice is a no-op.
"""
from __future__ import annotations

import logging
import types
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch.nn as nn

from corept.architecture import COMPONENTS, Architecture, Quirks
from corept.errors import InvalidOptionsError, UnsupportedArchitectureError
from corept.hookspecs import COMPONENT_HOOKS, COMPONENT_ROLES
from corept.plugins import PluginRecord, get_plugin_manager
from corept.replacement import Replacement
from corept.report import PatchReport
from corept.versions import transformers_supported

logger = logging.getLogger("corept")

STATE_ATTR = "_corept_patch_state"


class _Missing:
    """'No instance attribute before patching'. Survives copy.deepcopy (and pickle) as itself: a
    deep-copied patched model (e.g. a TRL reference model) must still unpatch correctly."""

    def __repr__(self) -> str:
        return "<missing>"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()


@dataclass
class _ModuleChange:
    module: nn.Module
    attrs: dict[str, Any] = field(default_factory=dict)  # name -> previous instance value or _MISSING
    new: dict[str, Any] = field(default_factory=dict)  # name -> the value corept set


@dataclass
class _PatchState:
    report: PatchReport
    changes: list[_ModuleChange]
    selection: tuple[frozenset, frozenset]


def _set_recorded(change: _ModuleChange, name: str, value: Any) -> None:
    if name not in change.attrs:
        change.attrs[name] = change.module.__dict__.get(name, _MISSING)
    setattr(change.module, name, value)
    change.new[name] = value


def _innermost(fn):
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def clone_with_globals(fn: types.FunctionType, overrides: dict[str, Any]) -> types.FunctionType:
    """A copy of ``fn`` whose global lookups see ``overrides`` first (fn itself is untouched)."""
    fn = _innermost(fn)
    scope = dict(fn.__globals__)
    scope.update(overrides)
    clone = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__qualname__ = fn.__qualname__
    clone.__doc__ = fn.__doc__
    return clone


def _apply(module: nn.Module, replacements: list[Replacement]) -> _ModuleChange:
    change = _ModuleChange(module)
    forward = None
    scope: dict[str, Any] = {}
    for r in replacements:
        if r.forward is not None:
            forward = r.forward
        scope.update(r.forward_globals)
        for name, value in r.attributes.items():
            _set_recorded(change, name, value)
    if scope:
        forward = clone_with_globals(forward or type(module).forward, scope)
    if forward is not None:
        _set_recorded(change, "forward", types.MethodType(forward, module))
    return change


def _undo(change: _ModuleChange) -> None:
    for name, old in change.attrs.items():
        current = change.module.__dict__.get(name, _MISSING)
        if current is not change.new.get(name, _MISSING):
            # Someone replaced our value after us (e.g. TRL's fused LM head wraps `forward`); their
            # wrapper captured ours, so removing it would drop their change. Leave it and say so.
            logger.warning("corept.unpatch: %s.%s was replaced after corept patched it; leaving the newer "
                           "value in place (it may still call corept's)", type(change.module).__name__, name)
            continue
        if old is _MISSING:
            change.module.__dict__.pop(name, None)
        else:
            change.module.__dict__[name] = old


def _selection(arch: Architecture, only: Iterable[str] | None, exclude: Iterable[str] | None) -> list[str]:
    for label, names in (("only", only), ("exclude", exclude)):
        bad = set(names or ()) - set(COMPONENTS)
        if bad:
            raise InvalidOptionsError(f"patch({label}=...) names unknown components {sorted(bad)}; "
                                      f"components are {list(COMPONENTS)}")
    chosen = [c for c in arch.components if only is None or c in set(only)]
    return [c for c in chosen if c not in set(exclude or ())]


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise InvalidOptionsError(f"corept.patch needs a transformers model with a .config; got {type(model).__name__}")
    return config


def resolve_architecture(model_type: str, *, strict: bool) -> tuple[Architecture, PluginRecord] | None:
    """The architecture for ``model_type``; warns (or raises with ``strict``) when none claims it."""
    pm = get_plugin_manager()
    found = pm.architecture_for(model_type)
    if found is None:
        installed = ", ".join(f"{r.name} ({', '.join(a.model_type for a in r.architectures)})"
                              for r in pm.records.values() if r.loaded) or "none"
        msg = (f"no corept plugin supports model_type {model_type!r}. Installed plugins: {installed}. "
               f"Install a plugin that declares it (pip install corept-<family>), or write one: "
               f"`corept new-plugin NAME` and docs/writing-a-plugin.md.")
        if strict:
            raise UnsupportedArchitectureError(msg)
        logger.warning("%s The model stays unpatched.", msg)
    return found


def patch(model: nn.Module, only: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
          *, strict: bool = False) -> nn.Module:
    """Patch ``model`` in place with its owning plugin's components and return it.

    :param only: patch only these components (``attention``, ``mlp``, ``rope``, ``norm``, ``loss``).
    :param exclude: patch all declared components but these.
    :param strict: raise :class:`UnsupportedArchitectureError` when no plugin claims the model.
    """
    config = _config(model)
    sel = (frozenset(only) if only is not None else frozenset(COMPONENTS), frozenset(exclude or ()))
    holder = model.get_base_model() if hasattr(model, "get_base_model") else model
    state: _PatchState | None = holder.__dict__.get(STATE_ATTR)
    if state is not None:
        if state.selection != sel:
            logger.warning("model is already patched with a different selection; call corept.unpatch(model) "
                           "first to change it. Keeping the current patches.")
        return model
    found = resolve_architecture(config.model_type, strict=strict)
    if found is None:
        holder.__dict__[STATE_ATTR] = _PatchState(PatchReport(plugin=None, model_type=config.model_type,
                                                             fallbacks={"*": "no plugin claims this model_type"}), [], sel)
        return model
    arch, rec = found
    report = PatchReport(plugin=rec.name, distribution=rec.distribution, model_type=arch.model_type,
                         notes=arch.notes)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    quirks = arch.quirks.resolve(text_config)
    report.quirks = quirks.to_dict()
    ok, reason = transformers_supported(arch.transformers)
    components = _selection(arch, only, exclude)
    changes: list[_ModuleChange] = []
    if not ok:
        logger.warning("corept plugin %r: %s; the model loads unpatched.", rec.name, reason)
        report.fallbacks = {c: reason for c in components}
    else:
        changes = _patch_components(model, arch, quirks, components, report)
    for c in set(COMPONENTS) - set(components):
        report.fallbacks.setdefault(c, "not selected" if c in arch.components else
                                    f"plugin {rec.name!r} does not patch {c}; transformers' implementation runs")
    holder.__dict__[STATE_ATTR] = _PatchState(report, changes, sel)
    return model


def _patch_components(model: nn.Module, arch: Architecture, quirks: Quirks, components: list[str],
                      report: PatchReport) -> list[_ModuleChange]:
    hook = get_plugin_manager().hook
    per_module: dict[int, tuple[nn.Module, list[Replacement]]] = {}
    impls: dict[str, Counter] = defaultdict(Counter)
    for component in components:
        role = COMPONENT_ROLES[component]
        classes = set(getattr(arch.roles, role))
        modules = [m for m in _unique_modules(model) if type(m).__name__ in classes]
        if not modules:
            report.fallbacks[component] = f"no module of class {sorted(classes) or '(none declared)'} in the model"
            continue
        caller = getattr(hook, COMPONENT_HOOKS[component])
        for m in modules:
            r = caller(arch=arch, quirks=quirks, module=m, model=model)
            if r is None:
                impls[component]["(transformers)"] += 1
                continue
            impls[component][r.implementation] += 1
            if r.fallback_reason:
                report.fallbacks[component] = r.fallback_reason
            per_module.setdefault(id(m), (m, []))[1].append(r)
        kept = impls[component].pop("(transformers)", 0)
        if impls[component]:
            report.applied[component] = ", ".join(f"{k} x{v}" for k, v in impls[component].items())
        if kept:
            what = "transformers' implementation"
            if component == "attention":
                what = f"transformers' AttentionInterface {getattr(model.config, '_attn_implementation', None)!r}"
            report.fallbacks.setdefault(component, f"{kept} module(s) kept {what} (no hook answered)")
    return [_apply(m, rs) for m, rs in per_module.values()]


def _unique_modules(model: nn.Module):
    seen = set()
    for m in model.modules():
        if id(m) not in seen:
            seen.add(id(m))
            yield m


def unpatch(model: nn.Module) -> nn.Module:
    """Undo every change :func:`patch` made to ``model``; a never-patched model is returned as is."""
    holder = state_holder(model)
    state: _PatchState | None = holder.__dict__.pop(STATE_ATTR, None) if holder is not None else None
    if state is not None:
        for change in reversed(state.changes):
            _undo(change)
    return model


def report(model: nn.Module) -> PatchReport:
    """The :class:`PatchReport` of a patched model (an empty one if it was never patched)."""
    holder = state_holder(model)
    state: _PatchState | None = holder.__dict__.get(STATE_ATTR) if holder is not None else None
    if state is None:
        return PatchReport(plugin=None, model_type=getattr(getattr(model, "config", None), "model_type", "?"),
                           fallbacks={"*": "not patched"})
    return state.report


def is_patched(model: nn.Module) -> bool:
    return state_holder(model) is not None


def state_holder(model: nn.Module) -> nn.Module | None:
    """The module carrying corept's patch state: ``model`` or, for a peft model, its base model."""
    candidates = [model]
    if hasattr(model, "get_base_model"):
        candidates.append(model.get_base_model())
    for m in candidates:
        if STATE_ATTR in m.__dict__:
            return m
    return None


def apply_extra(model: nn.Module, component: str, pairs: list[tuple[nn.Module, Replacement]],
                fallback: str | None = None) -> None:
    """Apply replacements made after :func:`patch` (e.g. fused LoRA by ``get_peft_model``), recorded
    in the same state so :func:`unpatch` undoes them too, and shown under ``component`` in the report."""
    holder = state_holder(model)
    if holder is None:
        raise InvalidOptionsError("model is not patched by corept; call corept.patch(model) first")
    state: _PatchState = holder.__dict__[STATE_ATTR]
    counts = Counter(r.implementation for _, r in pairs)
    for m, r in pairs:
        state.changes.append(_apply(m, [r]))
    if counts:
        state.report.applied[component] = ", ".join(f"{k} x{v}" for k, v in counts.items())
    if fallback:
        state.report.fallbacks[component] = fallback
