"""What a plugin declares about an architecture, as frozen data.

The core never names an architecture: plugins return :class:`Architecture` objects from the
``corept_register_architectures`` hook, and everything architecture-specific (which module classes
play which role, numerical quirks, the transformers range, LoRA targets, name aliases) is read from
them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Union

NORM_CASTINGS = ("llama", "gemma", "none")
MLP_ACTIVATIONS = ("swiglu", "geglu_tanh", "geglu")


@dataclass(frozen=True)
class FromConfig:
    """A quirk value read from the model config at patch time.

    :param attr: attribute name on the (text) config, e.g. ``"attn_logit_softcapping"``.
    :param default: value when the attribute is absent.
    """

    attr: str
    default: Any = None

    def __repr__(self) -> str:
        return f"config.{self.attr}"


QuirkValue = Union[Any, FromConfig]


@dataclass(frozen=True)
class Quirks:
    """Numerical and loading quirks of one architecture.

    :param force_float32: load in float32 when fp16 is requested or bf16 is unsupported (the
        architecture overflows in fp16).
    :param disable_sdpa: never run SDPA attention; use ``attn_implementation`` instead.
    :param attn_implementation: the attention implementation forced at load (``"eager"``, ...);
        ``None`` keeps transformers' default unless ``disable_sdpa`` is set (then ``"eager"``).
    :param norm_offset: RMSNorm computes ``x_hat * (norm_offset + weight)`` (gemma: 1.0).
    :param norm_casting: ``"llama"`` (rstd in fp32, cast before the weight multiply), ``"gemma"``
        (everything in fp32) or ``"none"``.
    :param mlp_activation: gated MLP activation: ``"swiglu"``, ``"geglu_tanh"`` or ``"geglu"``.
    :param attn_softcap: attention-logit softcap (tanh capping), a number or :class:`FromConfig`.
    :param final_logit_softcap: final-logit softcap before the loss.
    :param embedding_scale: multiply input embeddings by this; ``"sqrt_hidden"`` for
        ``sqrt(hidden_size)`` cast to the model dtype.
    :param sliding_window: attention sliding window (tokens) or ``None``.
    :param attention_bias: q/k/v projections carry a bias (fused LoRA QKV falls back).
    :param qk_norm: per-head RMSNorm on q and k before RoPE.
    """

    force_float32: bool = False
    disable_sdpa: bool = False
    attn_implementation: str | None = None
    norm_offset: float = 0.0
    norm_casting: str = "llama"
    mlp_activation: str = "swiglu"
    attn_softcap: QuirkValue = None
    final_logit_softcap: QuirkValue = None
    embedding_scale: QuirkValue = None
    sliding_window: QuirkValue = None
    attention_bias: QuirkValue = False
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.norm_casting not in NORM_CASTINGS:
            raise ValueError(f"norm_casting must be one of {NORM_CASTINGS}, got {self.norm_casting!r}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {MLP_ACTIVATIONS}, got {self.mlp_activation!r}")

    @property
    def forced_attn_implementation(self) -> str | None:
        """The attention implementation corept forces at load, or ``None`` for the default."""
        if self.attn_implementation:
            return self.attn_implementation
        return "eager" if self.disable_sdpa else None

    def resolve(self, config: Any) -> "Quirks":
        """A copy with every :class:`FromConfig` replaced by its value on ``config``."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, FromConfig):
                v = getattr(config, v.attr, v.default)
            if f.name == "embedding_scale" and v == "sqrt_hidden":
                v = math.sqrt(getattr(config, "hidden_size"))
            values[f.name] = v
        return replace(self, **values)

    def to_dict(self) -> dict:
        # not asdict(): it would turn each FromConfig into a dict before it could be shown as config.<attr>
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: (repr(v) if isinstance(v, FromConfig) else v) for k, v in values.items()}


@dataclass(frozen=True)
class ModuleRoles:
    """Which module classes (by class name, as transformers defines them) play which role.

    Every field is a tuple of class names; an empty tuple means the architecture has no module of
    that role, or the plugin does not patch it.
    """

    attention: tuple[str, ...] = ()
    mlp: tuple[str, ...] = ()
    norm: tuple[str, ...] = ()
    rotary: tuple[str, ...] = ()
    decoder_layer: tuple[str, ...] = ()
    causal_lm: tuple[str, ...] = ()

    @classmethod
    def standard(cls, prefix: str, **overrides: tuple[str, ...]) -> "ModuleRoles":
        """Roles named by transformers' convention: ``{prefix}Attention``, ``{prefix}MLP``,
        ``{prefix}RMSNorm``, ``{prefix}RotaryEmbedding``, ``{prefix}DecoderLayer``,
        ``{prefix}ForCausalLM``; ``overrides`` replace single fields."""
        roles = dict(attention=(f"{prefix}Attention",), mlp=(f"{prefix}MLP",), norm=(f"{prefix}RMSNorm",),
                     rotary=(f"{prefix}RotaryEmbedding",), decoder_layer=(f"{prefix}DecoderLayer",),
                     causal_lm=(f"{prefix}ForCausalLM",))
        roles.update(overrides)
        return cls(**roles)

    def role_of(self, class_name: str) -> str | None:
        """The role a module class plays, or ``None``."""
        for f in fields(self):
            if class_name in getattr(self, f.name):
                return f.name
        return None


COMPONENTS = ("attention", "mlp", "rope", "norm", "loss")


@dataclass(frozen=True)
class Architecture:
    """One architecture a plugin supports.

    :param model_type: ``config.model_type`` this declaration claims (``"llama"``, ...).
    :param roles: module classes per role.
    :param quirks: numerical/loading quirks.
    :param transformers: PEP 440 specifier of the transformers versions the patches support;
        outside it the model loads unpatched with a logged reason.
    :param lora_targets: default LoRA target module names.
    :param aliases: ``(alias, repo_id_or_path)`` pairs ``corept.load`` resolves, e.g.
        ``("llama-3.1-8b", "meta-llama/Llama-3.1-8B")``.
    :param priority: breaks ties when two plugins claim one model_type (higher wins); equal
        priorities are a conflict.
    :param components: the components this plugin patches; others stay HF's (reported).
    :param notes: free text shown by ``corept inspect`` (e.g. "experts stay HF's").
    :param text_config_attr: for multimodal configs, the attribute holding the text config.
    """

    model_type: str
    roles: ModuleRoles
    quirks: Quirks = field(default_factory=Quirks)
    transformers: str = ">=5.17"
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    aliases: tuple[tuple[str, str], ...] = ()
    priority: int = 0
    components: tuple[str, ...] = COMPONENTS
    notes: str = ""
    text_config_attr: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"{self.model_type}: unknown components {sorted(unknown)}; known: {COMPONENTS}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["quirks"] = self.quirks.to_dict()
        d["aliases"] = dict(self.aliases)
        return d
