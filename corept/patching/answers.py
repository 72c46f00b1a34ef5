"""What a component hook answers: a :class:`Replacement` to install, or a :class:`Keep` with its reason."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

CALL_STYLES = ("positional", "mapping")


@dataclass(frozen=True)
class Replacement:
    """A change to one module instance (and, through :attr:`children`, to some of its submodules).

    :param implementation: short name for the report, e.g. ``"acme:attention"``. Leave it empty
        when :attr:`kernel` names the ``corept_kernels`` kernel that runs: the report then shows
        ``"triton:<kernel>"`` or ``"torch:<kernel>"`` for the device the model is on *now*.
    :param kernel: the ``corept_kernels`` kernel behind this replacement, if any.
    :param forward: new forward. corept installs it with the exact signature of the forward it
        replaces (parameter names, order, defaults), so callers that inspect or call it by keyword
        see no difference. It is called as ``forward(self, *values)`` with the replaced
        forward's parameters in their order (``call_style="positional"``: ``*args`` and
        ``**kwargs`` passed on as such), or as ``forward(self, arguments)`` with one dict of every
        argument by name (``call_style="mapping"``). ``None`` keeps the current forward.
    :param call_style: see :attr:`forward`.
    :param attributes: extra instance attributes to set (e.g. the helper a forward calls); each is
        recorded and removed by :func:`corept.unpatch`.
    :param forward_globals: module-global names to rebind for this instance only: the current
        forward's function is cloned with a private copy of its globals in which these names are
        replaced (how RoPE is swapped without touching transformers' ``apply_rotary_pos_emb``
        process-wide). Applied to ``forward`` when one is given, else to the class's forward.
    :param children: ``{attribute name: Replacement}`` for submodules of this module (e.g. the
        q/k/v projections of an attention module).
    :param fallback_reason: set when part of this answer could not be applied as asked (a torch
        twin instead of a Triton kernel, some children left alone); shown in the report.
    """

    implementation: str = ""
    kernel: str | None = None
    forward: Callable | None = None
    call_style: str = "positional"
    attributes: Mapping[str, Any] = field(default_factory=dict)
    forward_globals: Mapping[str, Any] = field(default_factory=dict)
    children: Mapping[str, "Replacement"] = field(default_factory=dict)
    fallback_reason: str | None = None

    def __post_init__(self) -> None:
        if not self.implementation and not self.kernel:
            raise ValueError("a Replacement needs an implementation name or the corept_kernels kernel it runs")
        if self.call_style not in CALL_STYLES:
            raise ValueError(f"call_style must be one of {CALL_STYLES}, got {self.call_style!r}")


@dataclass(frozen=True)
class Keep:
    """Keep transformers' implementation for this module, for ``reason`` (shown in the report).

    Unlike ``None`` ("no opinion: ask the next plugin"), a ``Keep`` ends the search.
    """

    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ValueError("Keep needs a reason: say why transformers' implementation stays")
