"""Quirks: what differs between architectures, split by who acts on it.

* :class:`LoadPolicy`: what ``corept.load`` applies before the weights load (dtype forcing, the
  attention implementation).
* :class:`Numerics`: parameters of corept's shared kernel-backed components (RMSNorm offset and
  casting, the gated activation, head-side logit math). A wrong value here makes a patch wrong, so
  every shared component also proves its math on a probe at patch time.
* :class:`Recorded`: facts transformers' own code applies in places corept leaves alone (attention
  softcap and sliding window inside the attention kernels, embedding/residual/attention
  multipliers inside the decoder). corept shows them, the planner reads them, and the conformance
  kit checks that every config field that changes the outputs is declared somewhere.

Any value may be a :class:`FromConfig`, read from the model's (text) config when an architecture is
resolved for a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Union

NORM_CASTINGS = ("scale_after_cast", "scale_in_fp32", "none")
MLP_ACTIVATIONS = ("swiglu", "geglu_tanh", "geglu")

#: transformers' activation names (``ACT2FN`` keys, as in ``config.hidden_act``) -> the gated kernel
#: that computes ``act(gate) * up`` with them. Names not listed resolve to themselves, and the shared
#: MLP keeps transformers' forward with that reason.
HF_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh",
                  "gelu": "geglu"}


@dataclass(frozen=True)
class FromConfig:
    """A quirk value read from the model config when the architecture is resolved.

    :param attr: attribute name on the (text) config, or a tuple of names: the first one present
        and not ``None`` wins (e.g. ``("hidden_activation", "hidden_act")``).
    :param default: value when no attribute is present.
    :param convert: applied to the value read (not to ``default``): a callable or a mapping
        (values missing from the mapping pass through unchanged).
    :param label: how the value is shown, e.g. ``"1 / config.logits_scaling"``.
    """

    attr: Union[str, tuple]
    default: Any = None
    convert: Union[Callable, Mapping, None] = field(default=None, compare=False, hash=False)
    label: str | None = None

    @property
    def attrs(self) -> tuple[str, ...]:
        return (self.attr,) if isinstance(self.attr, str) else tuple(self.attr)

    def read(self, config: Any) -> Any:
        for name in self.attrs:
            value = getattr(config, name, None)
            if value is not None:
                if isinstance(self.convert, Mapping):
                    return self.convert.get(value, value)
                return self.convert(value) if self.convert is not None else value
        return self.default

    @classmethod
    def reciprocal(cls, attr: str, default: float = 1.0) -> "FromConfig":
        """``1 / config.<attr>`` (e.g. a model that divides its logits by ``config.logits_scaling``)."""
        return cls(attr, default, convert=lambda v: 1.0 / float(v), label=f"1 / config.{attr}")

    def __repr__(self) -> str:
        return self.label or " or ".join(f"config.{a}" for a in self.attrs)


QuirkValue = Union[Any, FromConfig]

#: the default gated activation: read from the config (some configs call it ``hidden_activation``).
ACTIVATION_FROM_CONFIG = FromConfig(("hidden_activation", "hidden_act"), default="silu", convert=HF_ACTIVATIONS)


class _Group:
    """Shared behaviour of the three quirk groups: resolution against a config and display."""

    def resolve(self, config: Any):
        """A copy with every :class:`FromConfig` replaced by its value on ``config``."""
        values = {f.name: (v.read(config) if isinstance(v, FromConfig) else v)
                  for f in fields(self) for v in (getattr(self, f.name),)}
        return _unvalidated(self, **values)

    def config_attrs(self) -> set[str]:
        """The config attributes this group reads (through :class:`FromConfig`) or records."""
        return {a for f in fields(self) for v in (getattr(self, f.name),) if isinstance(v, FromConfig) for a in v.attrs}

    def to_dict(self) -> dict:
        # FromConfig shown as "config.<attr>", not turned into a dict by dataclasses.asdict
        return {f.name: (repr(v) if isinstance(v, FromConfig) else v) for f in fields(self) for v in (getattr(self, f.name),)}


@dataclass(frozen=True)
class LoadPolicy(_Group):
    """What ``corept.load`` applies.

    :param force_float32: load in float32 when fp16 is requested or bf16 is unsupported (the
        architecture overflows in fp16).
    :param disable_sdpa: never run SDPA attention; use ``attn_implementation`` (default ``"eager"``).
    :param attn_implementation: the attention implementation forced at load; ``None`` keeps
        transformers' default unless ``disable_sdpa`` is set.
    """

    force_float32: bool = False
    disable_sdpa: bool = False
    attn_implementation: str | None = None

    @property
    def forced_attn_implementation(self) -> str | None:
        """The attention implementation corept forces at load, or ``None`` for the default."""
        if self.attn_implementation:
            return self.attn_implementation
        return "eager" if self.disable_sdpa else None


@dataclass(frozen=True)
class Numerics(_Group):
    """Parameters of corept's shared components. Each is proven on a probe when a model is patched.

    :param norm_offset: RMSNorm computes ``x_hat * (norm_offset + weight)`` (1.0 for ``1 + w`` norms).
    :param norm_casting: ``"scale_after_cast"`` (rstd in fp32, the normalized input cast back to its
        dtype, then multiplied by the weight), ``"scale_in_fp32"`` (everything in fp32, one cast at
        the end) or ``"none"``.
    :param mlp_activation: gated activation ``act(gate) * up``: ``"swiglu"``, ``"geglu_tanh"`` or
        ``"geglu"``; by default read from the config (``hidden_activation`` / ``hidden_act``).
    :param logit_scale: logits are ``logit_scale * lm_head(h)`` (e.g. ``FromConfig.reciprocal(
        "logits_scaling")`` for a model dividing by ``config.logits_scaling``).
    :param final_logit_softcap: ``cap * tanh(logits / cap)`` after the scale, before the loss.
    """

    norm_offset: QuirkValue = 0.0
    norm_casting: QuirkValue = "scale_after_cast"
    mlp_activation: QuirkValue = ACTIVATION_FROM_CONFIG
    logit_scale: QuirkValue = 1.0
    final_logit_softcap: QuirkValue = None

    def __post_init__(self) -> None:
        if not isinstance(self.norm_casting, FromConfig) and self.norm_casting not in NORM_CASTINGS:
            raise ValueError(f"norm_casting must be one of {NORM_CASTINGS}, got {self.norm_casting!r}")
        act = self.mlp_activation
        if not isinstance(act, FromConfig) and act not in MLP_ACTIVATIONS and act not in HF_ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {MLP_ACTIVATIONS} (or a transformers activation name "
                             f"in {sorted(HF_ACTIVATIONS)}, or FromConfig(...)), got {act!r}")

    def resolve(self, config: Any) -> "Numerics":
        resolved = super().resolve(config)
        act = HF_ACTIVATIONS.get(resolved.mlp_activation, resolved.mlp_activation)
        scale = 1.0 if resolved.logit_scale is None else float(resolved.logit_scale)
        cap = None if resolved.final_logit_softcap is None else float(resolved.final_logit_softcap)
        # not re-validated: an unknown activation read from a config is the MLP component's reason to keep HF's
        return _unvalidated(resolved, mlp_activation=act, logit_scale=scale, final_logit_softcap=cap)


def _unvalidated(obj, **changes):
    """``dataclasses.replace`` without ``__post_init__`` (resolved values may be outside the declared sets)."""
    new = object.__new__(type(obj))
    for f in fields(obj):
        object.__setattr__(new, f.name, changes.get(f.name, getattr(obj, f.name)))
    return new


@dataclass(frozen=True)
class Recorded(_Group):
    """Facts applied by transformers' code that corept does not replace.

    :param attn_softcap: attention-logit softcap (inside the attention implementation).
    :param sliding_window: attention sliding window, in tokens (transformers' mask functions).
    :param config: other config fields that change the model's outputs, each with how they are
        handled, e.g. ``{"embedding_multiplier": "scales the embeddings in the decoder's forward"}``.
        The conformance kit moves each such field away from its default and requires it here (or
        read by a :class:`FromConfig`).
    """

    attn_softcap: QuirkValue = None
    sliding_window: QuirkValue = None
    config: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", dict(self.config))

    def config_attrs(self) -> set[str]:
        return super().config_attrs() | set(self.config)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["config"] = dict(self.config)
        return d
