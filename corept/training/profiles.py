"""``corept train --profile``: preset sizes from the seed's RTX 3090 (24 GB) table, and the planner hook.

A profile fills the options the user did not give (explicit flags always win). The table is a plain
dict, :data:`PROFILES`; ``--profile auto`` asks a *planner* (a function in :data:`PLANNERS`) for the
same fields, computed from the model's config and the detected GPU. The default ``auto`` planner
is ``corept.planning.recommend`` when that package is installed; :func:`register_planner` replaces
or adds planners (``--profile NAME`` then calls it).

A planner is called as ``planner(model=NAME_OR_PATH, method="lora"|"qlora"|"full",
max_seq_length=..., batch_size=..., r=..., optim=...)`` (the pinned values or ``None``) and
returns a dict with any of ``max_seq_length``, ``batch_size``, ``grad_accum``, ``r``, ``optim``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from corept.errors import CoreptError, InvalidOptionsError

OPTIM_GPU = "adamw_8bit"  # bitsandbytes 8-bit AdamW: 2 bytes of state per trainable parameter
OPTIM_CPU = "adamw_torch"


@dataclass(frozen=True)
class Profile:
    """Preset training sizes for one model-size class (what fits a 24 GB RTX 3090 with QLoRA)."""

    description: str
    max_seq_length: int
    batch_size: int
    grad_accum: int
    r: int

    def fields(self) -> dict:
        """The option values this profile sets (``lora_alpha`` follows ``r``)."""
        d = asdict(self)
        d.pop("description")
        d["lora_alpha"] = self.r
        return d


#: The seed's RTX 3090 table. Optimizer: adamw_8bit on GPU, AdamW (torch) on CPU.
PROFILES: dict[str, Profile] = {
    "small": Profile("1-3B parameters", max_seq_length=2048, batch_size=4, grad_accum=1, r=64),
    "medium": Profile("7-13B parameters", max_seq_length=1024, batch_size=2, grad_accum=4, r=32),
    "large": Profile("20B+ parameters", max_seq_length=256, batch_size=1, grad_accum=8, r=16),
}


def _planning_recommend(*, model, method, max_seq_length=None, batch_size=None, r=None, optim="adamw"):
    """The ``auto`` planner: ``corept.planning.recommend`` (VRAM estimate from the config)."""
    try:
        from corept.planning import recommend
    except ImportError as exc:
        raise InvalidOptionsError("--profile auto needs the VRAM planner (corept.planning), which is not "
                                  f"installed here ({exc}); use --profile small|medium|large or explicit "
                                  "sizes.") from exc
    return recommend(model, method, max_seq_length=max_seq_length, batch_size=batch_size, r=r, optim=optim)


#: name -> planner; ``--profile NAME`` for a name here calls the planner instead of the table.
PLANNERS: dict[str, Callable[..., dict]] = {"auto": _planning_recommend}
_PLANNED_FIELDS = ("max_seq_length", "batch_size", "grad_accum", "r", "optim")


def register_planner(name: str, planner: Callable[..., dict]) -> None:
    """Make ``--profile name`` call ``planner`` (see the module docstring for its contract)."""
    if name in PROFILES:
        raise InvalidOptionsError(f"{name!r} is a preset profile; choose another planner name")
    PLANNERS[name] = planner


def profile_names() -> list[str]:
    """Every accepted ``--profile`` value: the presets, then the planners."""
    return list(PROFILES) + [n for n in PLANNERS if n not in PROFILES]


def default_optim(on_gpu: bool) -> str:
    return OPTIM_GPU if on_gpu else OPTIM_CPU


def resolve_profile(name: str | None, *, model: str, method: str, pinned: dict, on_gpu: bool) -> dict:
    """The option values profile ``name`` contributes (``{}`` for ``None``).

    :param method: ``"lora"``, ``"qlora"`` or ``"full"`` (what the planner sizes).
    :param pinned: options the user gave explicitly (passed to planners so they search the rest).
    :raises InvalidOptionsError: unknown profile, missing planner, or the planner's own error.
    """
    if name is None:
        return {}
    if name in PROFILES:
        values = PROFILES[name].fields()
        values["optim"] = default_optim(on_gpu)
        return values
    if name not in PLANNERS:
        raise InvalidOptionsError(f"--profile {name!r} is unknown; choose one of {profile_names()}")
    kwargs = {k: pinned.get(k) for k in ("max_seq_length", "batch_size", "r")}
    try:
        planned = PLANNERS[name](model=model, method=method, optim="adamw_8bit" if on_gpu else "adamw", **kwargs)
    except InvalidOptionsError:
        raise
    except CoreptError as exc:
        raise InvalidOptionsError(f"--profile {name}: the planner could not size this run: {exc}") from exc
    values = {k: planned[k] for k in _PLANNED_FIELDS if planned.get(k) is not None}
    if values.get("optim") == "adamw":  # the planner's name for plain AdamW
        values["optim"] = OPTIM_CPU
    if "r" in values:
        values["lora_alpha"] = values["r"]
    return values
