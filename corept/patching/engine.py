"""Apply and undo patches on ONE model instance.

Nothing here touches a class, a transformers module global or a torch function: each change is an
instance attribute (a bound ``forward`` or a helper attribute), recorded with what it replaced so
:func:`unpatch` restores the instance exactly. Patching twice is a no-op.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable

import torch.nn as nn

from corept.errors import InvalidOptionsError, PluginHookError
from corept.patching import hub_kernels
from corept.patching.answers import Keep, Replacement
from corept.patching.compile import compile_layers
from corept.patching.state import STATE_ATTR, PatchState, install
from corept.registry.declarations import COMPONENTS
from corept.registry.declarations import COMPONENT_ROLES
from corept.registry.hookspecs import COMPONENT_HOOKS
from corept.registry.manager import get_plugin_manager
from corept.registry.resolution import ResolvedArchitecture, resolve

logger = logging.getLogger("corept")


def _selection(only: Iterable[str] | None, exclude: Iterable[str] | None) -> tuple[frozenset, frozenset]:
    for label, names in (("only", only), ("exclude", exclude)):
        bad = set(names or ()) - set(COMPONENTS)
        if bad:
            raise InvalidOptionsError(f"patch({label}=...) names unknown components {sorted(bad)}; "
                                      f"components are {list(COMPONENTS)}")
    return (frozenset(only) if only is not None else frozenset(COMPONENTS), frozenset(exclude or ()))


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise InvalidOptionsError(f"corept.patch needs a transformers model with a .config; got {type(model).__name__}")
    return config


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper, else ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def state_of(model: nn.Module) -> PatchState | None:
    """The patch state of ``model`` (or of its peft base model), or ``None`` if never patched."""
    for m in (model, base_of(model)):
        state = m.__dict__.get(STATE_ATTR)
        if state is not None:
            return state
    return None


def architecture_of(model: nn.Module) -> ResolvedArchitecture | None:
    """The architecture resolved when ``model`` was patched (``None``: unpatched or unclaimed)."""
    state = state_of(model)
    return state.arch if state is not None else None


def patch(model: nn.Module, only: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
          *, strict: bool = False, compile=None) -> nn.Module:
    """Patch ``model`` in place with the components its architecture's plugins answer, and return it.

    :param only: patch only these components (``attention``, ``mlp``, ``rope``, ``norm``, ``loss``).
    :param exclude: patch all declared components but these.
    :param strict: raise :class:`UnsupportedArchitectureError` when no plugin claims the model.
    :param compile: each decoder layer as one ``torch.compile`` region (:mod:`corept.patching.compile`):
        ``None`` on CUDA only, ``True``/``False``, or a dict of ``torch.compile`` arguments.
    """
    config = _config(model)
    if state_of(model) is not None:
        return apply(model, None, only, exclude)
    return apply(model, resolve(config, strict=strict), only, exclude, compile=compile)


def apply(model: nn.Module, arch: ResolvedArchitecture | None, only: Iterable[str] | None = None,
          exclude: Iterable[str] | None = None, *, compile=None) -> nn.Module:
    """:func:`patch` with the architecture already resolved (``corept.load`` resolves it once, for
    its load policy, and hands it on); a no-op on a patched model."""
    config = _config(model)
    sel = _selection(only, exclude)
    holder = base_of(model)
    state = state_of(model)
    if state is not None:
        if state.selection != sel:
            logger.warning("model is already patched with a different selection; call corept.unpatch(model) "
                           "first to change it. Keeping the current patches.")
        return model
    state = PatchState(arch=arch, model_type=config.model_type, selection=sel)
    holder.__dict__[STATE_ATTR] = state
    if arch is None:
        state.keep("*", "no plugin claims this model_type")
        return model
    chosen = [c for c in COMPONENTS if c in sel[0] and c not in sel[1]]
    for c in COMPONENTS:
        if c not in chosen:
            state.keep(c, "not selected (corept.patch only=/exclude=)")
    if not arch.supported:
        logger.warning("corept plugin %r: %s; the model loads unpatched.", arch.plugin, arch.unsupported_reason)
        for c in chosen:
            state.keep(c, arch.unsupported_reason)
        return model
    change = hub_kernels.turn_off(holder)  # before any forward is installed: kernelization would replace them
    if change is not None:
        state.changes.append(change)
        state.settings[hub_kernels.SETTING] = "turned off for this model (it would replace corept's forwards)"
    per_module: dict[int, tuple[nn.Module, list]] = {}
    for component in chosen:
        if component not in arch.components and component not in arch.keep:
            continue  # nothing of it declared (experts on a dense model): not part of this architecture
        if component in arch.keep:
            state.keep(component, f"plugin {arch.plugin!r} keeps it: {arch.keep[component]}")
            continue
        for module, answer in _ask_component(model, arch, component, state):
            per_module.setdefault(id(module), (module, []))[1].append((component, answer))
    for module, answers in per_module.values():
        _install(state, module, answers)
    layers = [m for m in _unique_modules(holder) if type(m).__name__ in set(arch.roles.decoder_layer)]
    compile_layers(holder, state, layers, compile)
    return model


def _raising_plugin(caller, exc: BaseException) -> str | None:
    """The name of the plugin whose implementation of ``caller`` is in ``exc``'s traceback."""
    codes = {getattr(impl.function, "__code__", None): impl.plugin_name for impl in caller.get_hookimpls()}
    tb, name = exc.__traceback__, None
    while tb is not None:
        name = codes.get(tb.tb_frame.f_code, name)
        tb = tb.tb_next
    return name


def ask(hook_name: str, arch: ResolvedArchitecture, module: nn.Module, model: nn.Module):
    """The first answer of ``hook_name`` for ``module`` (a :class:`Replacement`, :class:`Keep` or ``None``).

    :raises PluginHookError: an implementation raised; the error names its plugin.
    """
    caller = getattr(get_plugin_manager().hook, hook_name)
    try:
        answer = caller(arch=arch, module=module, model=model)
    except Exception as exc:
        plugin = _raising_plugin(caller, exc) or "?"
        rec = get_plugin_manager().records.get(plugin)
        dist = f" (distribution {rec.distribution})" if rec is not None and rec.distribution else ""
        raise PluginHookError(
            f"corept plugin {plugin!r}{dist} raised {type(exc).__name__}: {exc} in {hook_name} for "
            f"{type(module).__name__}; fix or update it, or set COREPT_DISABLE_PLUGINS={plugin}") from exc
    if answer is not None and not isinstance(answer, (Replacement, Keep)):
        raise TypeError(f"{hook_name} answered {type(answer).__name__} for {type(module).__name__}; a hook "
                        f"answers corept.Replacement, corept.Keep or None")
    return answer


def _install(state: PatchState, module: nn.Module, answers: list[tuple[str, object]]) -> None:
    """Record Keeps (and unanswered modules) as reasons, install the Replacements as one change."""
    replacements = []
    for component, answer in answers:
        if isinstance(answer, Replacement):
            replacements.append((component, answer))
            if answer.fallback_reason:
                state.keep(component, answer.fallback_reason)
        else:
            state.keep(component, answer.reason if answer is not None else
                       f"{type(module).__name__}: no hook answered (no plugin patches it)")
    if replacements:
        state.changes += install(module, replacements)


def record(model: nn.Module, component: str, answers: list[tuple[nn.Module, object]]) -> None:
    """Install and record hook answers made after :func:`patch` (e.g. by ``get_peft_model``), so
    :func:`unpatch` undoes them and the report shows them under ``component``."""
    state = state_of(model)
    if state is None:
        raise InvalidOptionsError("model is not patched by corept; call corept.patch(model) first")
    for module, answer in answers:
        _install(state, module, [(component, answer)])


def _ask_component(model: nn.Module, arch: ResolvedArchitecture, component: str, state: PatchState):
    classes = set(getattr(arch.roles, COMPONENT_ROLES[component]))
    modules = [m for m in _unique_modules(model) if type(m).__name__ in classes]
    if not modules:
        state.keep(component, f"no module of class {sorted(classes) or '(none declared)'} in the model")
    return [(m, ask(COMPONENT_HOOKS[component], arch, m, model)) for m in modules]


def _unique_modules(model: nn.Module):
    seen = set()
    for m in model.modules():
        if id(m) not in seen:
            seen.add(id(m))
            yield m


def unpatch(model: nn.Module) -> nn.Module:
    """Undo every change :func:`patch` made to ``model``; a never-patched model is returned as is."""
    for m in (model, base_of(model)):
        state: PatchState | None = m.__dict__.pop(STATE_ATTR, None)
        if state is not None:
            for change in reversed(state.changes):
                change.undo()
            from corept.components.experts_4bit import unpatched

            unpatched(state)
            break
    return model


def is_patched(model: nn.Module) -> bool:
    return state_of(model) is not None


def reason_counts(reasons: list[str]) -> str:
    """``"reason"`` or ``"N module(s): reason"``, per distinct reason, ``"; "``-separated."""
    return "; ".join(r if n == 1 else f"{n} modules: {r}" for r, n in Counter(reasons).items())
