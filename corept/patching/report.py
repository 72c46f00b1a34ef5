"""What corept has installed on a model *now*, read from its patch state and the live module tree.

The report is built on every call: a forward corept installed but something replaced afterwards
(a hub kernelization, a user, another library) is reported as replaced, not as applied; a kernel
that cannot run on the model's current device is shown as its torch twin, with the reason.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch.nn as nn

from corept.patching.engine import base_of, reason_counts, state_of
from corept.patching.state import forward_chain


@dataclass
class PatchReport:
    """The state of one model instance's patches.

    :param plugin: name of the plugin owning the architecture (``None`` if none claimed it).
    :param distribution: the distribution shipping that plugin.
    :param model_type: ``config.model_type`` of the model.
    :param applied: component -> what runs now, e.g. ``{"norm": "triton:rms_norm x9"}``, counting
        modules (a q/k/v group counts its three projections).
    :param fallbacks: component -> why (some of) its modules run transformers' implementation, a
        torch twin, or no longer run corept's forward.
    :param quirks: the resolved quirks, one flat dict.
    :param settings: model-level state: ``checkpointing``, ``hub_kernels``.
    :param notes: the architecture's notes.
    """

    plugin: str | None
    model_type: str
    distribution: str | None = None
    applied: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    quirks: dict = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    notes: str = ""

    @property
    def patched(self) -> bool:
        return bool(self.applied)

    def to_dict(self) -> dict:
        return asdict(self)


def _device(model: nn.Module):
    for p in model.parameters():
        return p.device
    return "cpu"


def label(implementation: str, kernel: str | None, device) -> tuple[str, str | None]:
    """What runs on ``device``: ``(name, why a torch twin runs or None)``; a kernel-backed part is
    ``triton:<kernel>`` or ``torch:<kernel>``, another one its implementation name."""
    if implementation or not kernel:
        return implementation, None
    from corept_kernels import can_run  # only models with kernel-backed patches get here

    ok, reason = can_run(kernel, device)
    return (f"triton:{kernel}", None) if ok else (f"torch:{kernel}", reason)


def _describe(module: nn.Module) -> str:
    fwd = module.__dict__.get("forward")
    if fwd is None:
        return "the class's forward"
    fn = getattr(fwd, "__func__", fwd)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def checkpointing(model: nn.Module) -> str:
    """Which checkpoint function the checkpointable layers of ``model`` call now."""
    layers = [m for m in base_of(model).modules() if hasattr(m, "_gradient_checkpointing_func")]
    on = [m for m in layers if getattr(m, "gradient_checkpointing", False)]
    if not on:
        return "off"
    ours = sum(getattr(m._gradient_checkpointing_func, "corept_checkpointing", False) for m in on)
    if ours == len(on):
        policy = getattr(on[0]._gradient_checkpointing_func, "corept_policy", None)
        return f"corept ({ours} layers)" + (f", {policy.describe()}" if policy is not None else "")
    return f"transformers' ({len(on) - ours} layers)" + (f", corept ({ours} layers)" if ours else "")


def report(model: nn.Module) -> PatchReport:
    """The :class:`PatchReport` of ``model`` as it is now (an empty one if it was never patched)."""
    state = state_of(model)
    config = getattr(model, "config", None)
    if state is None:
        return PatchReport(plugin=None, model_type=getattr(config, "model_type", "?"), fallbacks={"*": "not patched"},
                           settings={"checkpointing": checkpointing(model)})
    arch = state.arch
    rep = PatchReport(plugin=arch.plugin if arch else None, model_type=state.model_type,
                      distribution=arch.distribution if arch else None, quirks=arch.quirks() if arch else {},
                      notes=arch.notes if arch else "", settings={"checkpointing": checkpointing(model),
                                                                  **state.settings})
    device = _device(model)
    applied: dict[str, dict[str, int]] = defaultdict(dict)
    reasons: dict[str, list[str]] = defaultdict(list)
    chains = {}
    for change in state.changes:
        if not change.parts:
            continue
        if id(change.module) not in chains:
            chains[id(change.module)] = forward_chain(change.module)
        fwd = change.new.get("forward")
        live = change.attributes_installed() and (fwd is None or fwd.__func__ in chains[id(change.module)])
        for component, implementation, kernel in change.parts:
            name, twin_reason = label(implementation, kernel, device)
            if live:
                applied[component][name] = applied[component].get(name, 0) + 1
                if twin_reason:
                    reasons[component].append(twin_reason)
            else:
                reasons[component].append(f"{name} was replaced after corept patched {type(change.module).__name__} "
                                          f"(now {_describe(change.module)}): corept's forward no longer runs there")
    for component, counts in applied.items():
        rep.applied[component] = ", ".join(f"{k} x{v}" for k, v in counts.items())
    for component, why in state.kept.items():
        reasons[component] += why
    rep.fallbacks = {c: reason_counts(r) for c, r in reasons.items() if r}
    return rep
