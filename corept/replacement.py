"""The value a patch hook returns: what to change on one module instance."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Replacement:
    """A change to one module instance, applied and recorded by :func:`corept.patch`.

    :param implementation: short name for reports, e.g. ``"triton:rms_norm"``.
    :param forward: new ``forward(self, *args, **kwargs)``, bound to the instance; ``None`` keeps
        the current forward.
    :param attributes: extra instance attributes to set (e.g. the rotary function an attention
        forward calls); each is recorded and removed by :func:`corept.unpatch`.
    :param forward_globals: module-global names to rebind for this instance only: the current
        forward's function is cloned with a private copy of its globals in which these names are
        replaced (how RoPE is swapped without touching transformers' ``apply_rotary_pos_emb``
        process-wide). Applied to ``forward`` when one is given, else to the class's forward.
    :param fallback_reason: set when the implementation runs a pure-torch twin instead of its
        Triton kernel (e.g. CPU without the Triton interpreter); shown in the report.
    """

    implementation: str
    forward: Callable | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    forward_globals: Mapping[str, Any] = field(default_factory=dict)
    fallback_reason: str | None = None
