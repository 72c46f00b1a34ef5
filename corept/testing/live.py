"""Checks of a patched model against its live module tree: the report, and the forwards' signatures.

Both read the modules themselves (which forward each one runs now, marked by corept when it
installed it), not corept's patch state, so a report that claims more or less than what runs, or
an installed forward whose signature differs from the one it replaced, fails.
"""
from __future__ import annotations

import inspect
import types
from collections import Counter

import torch.nn as nn

import corept
from corept.patching.engine import base_of, state_of
from corept.patching.state import MISSING, forward_chain
from corept.registry.declarations import COMPONENT_ROLES


def live_parts(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """``{id(module): [(component, implementation), ...]}`` of what runs on each module now: the
    corept forwards in its forward chain (its forward and the corept forwards that one still
    calls), and attribute-only answers whose attributes are all still on the module."""
    parts = {id(m): [p for fn in forward_chain(m) for p in fn.__corept_parts__] for m in model.modules()}
    state = state_of(model)
    for change in state.changes if state is not None else ():
        if change.parts and "forward" not in change.new and all(
                change.module.__dict__.get(n, MISSING) is v for n, v in change.new.items()):
            parts.setdefault(id(change.module), []).extend((c, impl or kernel) for c, impl, kernel in change.parts)
    return parts


def live_forwards(model: nn.Module) -> Counter:
    """``{(component, implementation): modules}`` over everything running on the model now."""
    counts: Counter = Counter()
    for parts in live_parts(model).values():
        counts.update(parts)
    return counts


def _parse(applied: dict) -> Counter:
    counts: Counter = Counter()
    for component, text in applied.items():
        for part in text.split(", "):
            name, _, n = part.rpartition(" x")
            counts[(component, name.split(":", 1)[-1] if name.startswith(("triton:", "torch:")) else name)] += int(n)
    return counts


def check_report(model: nn.Module) -> None:
    """Every statement of ``corept.report(model)`` holds in the live module tree.

    * each ``applied`` entry counts exactly the modules running that corept forward, and no corept
      forward runs unreported;
    * every module of a component's role that does not run corept's forward for it has a fallback
      reason for that component (a component not selected or kept by the plugin included);
    * the checkpointing setting is what the layers call.
    """
    rep = corept.report(model)
    live = live_forwards(model)
    claimed = _parse(rep.applied)
    assert claimed == live, f"report claims {dict(claimed)} but the modules run {dict(live)}"
    state = state_of(model)
    arch = state.arch if state is not None else None
    parts = live_parts(model)
    for component, role in COMPONENT_ROLES.items():
        classes = set(getattr(arch.roles, role)) if arch is not None else set()
        bare = [m for m in base_of(model).modules() if type(m).__name__ in classes
                and component not in {c for c, _ in parts.get(id(m), ())}]
        assert not bare or component in rep.fallbacks, (
            f"{len(bare)} {type(bare[0]).__name__} module(s) run no corept {component} forward and the report "
            f"gives no reason; fallbacks: {rep.fallbacks}")
    layers = [m for m in base_of(model).modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_gradient_checkpointing_func")]
    ours = sum(bool(getattr(m._gradient_checkpointing_func, "corept_checkpointing", False)) for m in layers)
    setting = rep.settings.get("checkpointing", "")
    assert (ours > 0) == ("corept" in setting) and (len(layers) == 0) == (setting == "off"), \
        f"checkpointing reported {setting!r}; layers: {len(layers)} checkpointed, {ours} with corept's function"


def replaced_forwards(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """``(module, the forward corept replaced)`` for every forward corept installed on ``model``."""
    state = state_of(model)
    out = []
    for change in state.changes if state is not None else ():
        if "forward" in change.new:
            previous = change.previous["forward"]
            original = (types.MethodType(type(change.module).forward, change.module) if previous is MISSING
                        else previous)
            out.append((change.module, original))
    return out


def check_signatures(model: nn.Module) -> int:
    """Every installed forward's signature equals the replaced one's; returns how many were checked."""
    pairs = replaced_forwards(model)
    for module, original in pairs:
        got, want = inspect.signature(module.forward), inspect.signature(original)
        assert got == want, f"{type(module).__name__}.forward{got} != the forward it replaced{want}"
    return len(pairs)
