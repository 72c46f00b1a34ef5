"""The patch state of one model instance: every change corept made, recorded so it can be undone.

Each change is an instance attribute (a bound ``forward`` or a helper) set on one module, with the
instance value it replaced (or its absence). The state lives in the ``__dict__`` of the model (the
base model under a peft wrapper), so it follows the instance through ``deepcopy``.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from corept.patching.answers import Replacement
from corept.patching.sharing import shared
from corept.patching.signature import clone_with_globals, faithful_forward, unbound_forward

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
        return "MISSING"


MISSING = _Missing()


@dataclass
class Change:
    """The attributes corept set on one module, and which components they serve.

    :param module: the module whose attributes changed.
    :param parts: ``(component, implementation, kernel)`` per answer installed here (a RoPE answer
        and an attention answer on one attention module share one forward); empty for model
        settings that are no component (hub kernelization turned off).
    :param previous: name -> previous instance value (or :data:`MISSING`).
    :param new: name -> the value corept set.
    """

    module: nn.Module
    parts: list[tuple[str, str, str | None]] = field(default_factory=list)
    previous: dict[str, Any] = field(default_factory=dict)
    new: dict[str, Any] = field(default_factory=dict)

    def set(self, name: str, value: Any) -> None:
        if name not in self.previous:
            self.previous[name] = self.module.__dict__.get(name, MISSING)
        setattr(self.module, name, value)
        self.new[name] = value

    def attributes_installed(self) -> bool:
        """Every attribute other than ``forward`` is still the module's instance value."""
        return all(self.module.__dict__.get(n, MISSING) is v for n, v in self.new.items() if n != "forward")

    def undo(self) -> None:
        for name, old in self.previous.items():
            if self.module.__dict__.get(name, MISSING) is not self.new.get(name, MISSING):
                # Someone replaced our value after us (e.g. TRL's fused LM head wraps `forward`); their
                # wrapper captured ours, so removing it would drop their change. Leave it and say so.
                logger.warning("corept.unpatch: %s.%s was replaced after corept patched it; leaving the newer "
                               "value in place (it may still call corept's)", type(self.module).__name__, name)
                continue
            if old is MISSING:
                self.module.__dict__.pop(name, None)
            else:
                self.module.__dict__[name] = old


@dataclass
class PatchState:
    """Everything :func:`corept.patch` and later steps did to one model.

    :param arch: the resolved architecture (``None`` when no plugin claims the model).
    :param model_type: ``config.model_type``.
    :param selection: the ``(only, exclude)`` components asked for.
    :param changes: every change, in the order made.
    :param kept: component -> reasons it kept transformers' implementation, one entry per module.
    :param settings: model-level facts for the report (e.g. hub kernelization turned off).
    :param options: options later steps gave the shared components (``get_peft_model``'s
        ``mlp_tile_rows``), read by their forwards at call time.
    """

    arch: Any
    model_type: str
    selection: tuple
    changes: list[Change] = field(default_factory=list)
    kept: dict[str, list[str]] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def keep(self, component: str, reason: str) -> None:
        self.kept.setdefault(component, []).append(reason)


def forward_chain(module: nn.Module) -> list:
    """The corept-installed functions ``module``'s forward runs now, outermost first: its current
    forward if corept installed it, then each forward that one replaced (and still calls) while
    that is corept's too."""
    chain = []
    current = module.__dict__.get("forward")
    fn = current.__func__ if isinstance(current, types.MethodType) and current.__self__ is module else None
    while fn is not None and getattr(fn, "__corept_parts__", None) is not None:
        chain.append(fn)
        fn = getattr(fn, "__corept_replaces__", None)
    return chain


def _installed_forward(module: nn.Module, impl, style: str, scope: dict, parts: tuple, replaces):
    """The forward :func:`install` binds to ``module`` (and to every instance it is equal for)."""
    if scope:
        forward = clone_with_globals(impl if impl is not None else type(module).forward, scope)
        if impl is not None:
            forward = faithful_forward(module, forward, call_style=style)
    else:
        forward = faithful_forward(module, impl, call_style=style)
    forward.__corept_parts__ = parts
    forward.__corept_replaces__ = replaces
    return forward


def install(module: nn.Module, answers: list[tuple[str, Replacement]]) -> list[Change]:
    """Apply the replacements answered for ``module`` (by one or more components), and their
    children; returns the recorded changes.

    One forward results: the last answer's ``forward`` (or the current one), cloned with every
    answer's ``forward_globals``, installed with the signature of the forward it replaces. The
    installed function (one per distinct definition, shared by the instances it is equal for:
    :mod:`corept.patching.sharing`) carries ``__corept_parts__`` (the components it serves) and
    ``__corept_replaces__`` (the forward it replaced, which fused forwards still call for the calls
    they cannot take), so the live module tree tells what runs.
    """
    change = Change(module, [(c, r.implementation, r.kernel) for c, r in answers])
    scope, impl, style = {}, None, "positional"
    for _, r in answers:
        for name, value in r.attributes.items():
            change.set(name, value)
        scope.update(r.forward_globals)
        if r.forward is not None:
            impl, style = r.forward, r.call_style
    if scope or impl is not None:
        parts = tuple((c, r.implementation or r.kernel) for c, r in answers)
        replaces = unbound_forward(module)
        # impl and the scope's values by id: the installed function keeps them alive
        key = ("forward", type(module), replaces, id(impl), style, parts,
               tuple(sorted((name, id(value)) for name, value in scope.items())))
        forward = shared(key, lambda: _installed_forward(module, impl, style, scope, parts, replaces))
        change.set("forward", types.MethodType(forward, module))
    changes = [change] if change.new else []
    children: dict[str, list] = {}
    for component, r in answers:
        for name, child in r.children.items():
            children.setdefault(name, []).append((component, child))
    for name, child_answers in children.items():
        changes += install(getattr(module, name), child_answers)
    return changes
