"""What :func:`corept.patch` did to a model, as data."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PatchReport:
    """The outcome of patching one model instance.

    :param plugin: name of the plugin owning the architecture (``None`` if none claimed it).
    :param distribution: the distribution shipping that plugin.
    :param model_type: ``config.model_type`` of the model.
    :param applied: component -> implementation, e.g. ``{"norm": "triton:rms_norm x9"}``.
    :param fallbacks: component -> why it kept transformers' implementation (or runs a torch twin).
    :param quirks: the resolved quirks, as a dict.
    :param notes: the architecture's notes (e.g. "experts stay HF's").
    """

    plugin: str | None
    model_type: str
    distribution: str | None = None
    applied: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    quirks: dict = field(default_factory=dict)
    notes: str = ""

    @property
    def patched(self) -> bool:
        return bool(self.applied)

    def to_dict(self) -> dict:
        return asdict(self)
