"""What a plugin declares about an architecture, as frozen data.

The core never names an architecture: plugins return :class:`Architecture` objects from the
``corept_register_architectures`` hook, and everything architecture-specific (which module classes
play which role, the names of their linear layers, quirks, the transformers range, known models
and their names) is read from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from corept.registry.quirks import LoadPolicy, Numerics, Recorded

COMPONENTS = ("attention", "mlp", "rope", "norm", "loss", "experts")
#: which :class:`ModuleRoles` field each component's modules come from
COMPONENT_ROLES = {"attention": "attention", "mlp": "mlp", "rope": "attention", "norm": "norm", "loss": "causal_lm",
                   "experts": "experts"}


@dataclass(frozen=True)
class ModuleRoles:
    """Which module classes (by class name, as transformers defines them) play which role.

    Every field is a tuple of class names; an empty tuple means the architecture has no module of
    that role. RoPE is applied inside the attention modules, so it has no role of its own.
    ``experts``: a mixture-of-experts layer's stacked expert weights (transformers' ``...Experts``
    modules); the router and the block around them are not part of it.
    """

    attention: tuple[str, ...] = ()
    mlp: tuple[str, ...] = ()
    norm: tuple[str, ...] = ()
    decoder_layer: tuple[str, ...] = ()
    causal_lm: tuple[str, ...] = ()
    experts: tuple[str, ...] = ()

    @classmethod
    def standard(cls, prefix: str, **overrides: tuple[str, ...]) -> "ModuleRoles":
        """Roles named by transformers' convention: ``{prefix}Attention``, ``{prefix}MLP``,
        ``{prefix}RMSNorm``, ``{prefix}DecoderLayer``, ``{prefix}ForCausalLM``; ``overrides``
        replace single fields."""
        roles = dict(attention=(f"{prefix}Attention",), mlp=(f"{prefix}MLP",), norm=(f"{prefix}RMSNorm",),
                     decoder_layer=(f"{prefix}DecoderLayer",), causal_lm=(f"{prefix}ForCausalLM",))
        roles.update(overrides)
        return cls(**roles)

    def role_of(self, class_name: str) -> str | None:
        """The role a module class plays, or ``None``."""
        for f in fields(self):
            if class_name in getattr(self, f.name):
                return f.name
        return None


@dataclass(frozen=True)
class Projections:
    """Attribute names of the linear layers inside the attention and MLP modules.

    The default is transformers' usual separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and
    ``gate_proj``/``up_proj``/``down_proj``. A model with fused linears declares them:
    ``Projections.fused()`` (``qkv_proj`` and ``gate_up_proj``, whose output is split in halves,
    gate first). Unused names are ``None``.
    """

    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    qkv: str | None = None
    o: str | None = "o_proj"
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    gate_up: str | None = None
    down: str | None = "down_proj"

    @classmethod
    def fused(cls, qkv: str | None = "qkv_proj", gate_up: str | None = "gate_up_proj", **names) -> "Projections":
        """Fused q/k/v and/or gate/up linears (pass ``None`` for one that is not fused)."""
        values = dict(qkv=qkv, gate_up=gate_up, **names)
        if qkv is not None:
            values.update(q=None, k=None, v=None)
        if gate_up is not None:
            values.update(gate=None, up=None)
        return cls(**values)

    def __post_init__(self) -> None:
        if self.qkv is not None and any((self.q, self.k, self.v)):
            raise ValueError("declare either q/k/v or a fused qkv projection, not both (Projections.fused())")
        if self.gate_up is not None and any((self.gate, self.up)):
            raise ValueError("declare either gate/up or a fused gate_up projection, not both (Projections.fused())")

    @property
    def attention(self) -> tuple[str, ...]:
        """Names of the attention's input projections (one input shared), then its output projection."""
        return tuple(n for n in (self.q, self.k, self.v, self.qkv, self.o) if n)

    @property
    def mlp(self) -> tuple[str, ...]:
        return tuple(n for n in (self.gate, self.up, self.gate_up, self.down) if n)


@dataclass(frozen=True)
class GGUFExport:
    """How an architecture is written as GGUF, the file format llama.cpp, Ollama and LM Studio read.

    :param arch: llama.cpp's name for the architecture (``general.architecture``), e.g. ``"llama"``,
        ``"qwen3"``, ``"gemma2"``.
    :param tensors: ``{transformers module path: GGUF tensor name}``, ``{bid}`` standing for the layer
        index (``{"model.layers.{bid}.mlp.gate_proj": "blk.{bid}.ffn_gate"}``); the ``.weight`` /
        ``.bias`` suffix is kept. Looked up first; modules not listed are named by the ``gguf``
        package's own table for ``arch``, so a plugin whose ``arch`` that table lacks lists every module.
    :param metadata: extra keys under ``{arch}.`` (``{"attn_logit_softcapping":
        FromConfig("attn_logit_softcapping")}``), on top of the sizes every decoder writes (context,
        embedding, feed-forward, layers, heads, kv heads, head size, norm epsilon, RoPE base and scaling,
        vocabulary); a value that resolves to ``None`` is left out.
    :param interleaved_rotary: llama.cpp applies RoPE to adjacent pairs for this ``arch`` (the llama
        family), so the q and k projections' rows are written permuted from transformers'
        half-split layout into that one.
    :param rope_freq_factors: RoPE types (``rope_type`` in the config) llama.cpp takes as a
        ``rope_freqs`` tensor: one divisor per frequency, read from the model's own rotary module
        (the core writes ``default``, ``linear`` and ``yarn`` itself; others are refused).

    Norm weights are written with the architecture's ``Numerics.norm_offset`` added (llama.cpp
    multiplies by the stored weight), so Gemma's ``1 + w`` needs no declaration of its own.
    """

    arch: str
    tensors: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    interleaved_rotary: bool = False
    rope_freq_factors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.arch or not isinstance(self.arch, str):
            raise ValueError("GGUFExport needs arch: llama.cpp's name for the architecture (general.architecture)")
        object.__setattr__(self, "tensors", dict(self.tensors))
        object.__setattr__(self, "metadata", dict(self.metadata))
        object.__setattr__(self, "rope_freq_factors", tuple(self.rope_freq_factors))

    def to_dict(self) -> dict:
        return {"arch": self.arch, "tensors": dict(self.tensors), "metadata": {k: repr(v) for k, v in self.metadata.items()},
                "interleaved_rotary": self.interleaved_rotary, "rope_freq_factors": list(self.rope_freq_factors)}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a Python package (usable offline, e.g. for ``corept demo``).

    :param package: import name of the package holding the file (located, never imported).
    :param filename: the GGUF file inside it (transformers reads GGUF through the ``gguf`` package).
    """

    package: str
    filename: str


@dataclass(frozen=True)
class KnownModel:
    """A public checkpoint of an architecture.

    :param repo_id: its hub id, e.g. ``"meta-llama/Llama-3.1-8B"``.
    :param aliases: short names ``corept.load`` and the CLI resolve to it (case-insensitive).
    :param config: the config fields that shape memory (sizes, heads, vocabulary, tying, rope),
        so ``corept plan`` answers offline; ``None`` when not given.
    :param embedded: where its weights ship inside a package, if they do.
    """

    repo_id: str
    aliases: tuple[str, ...] = ()
    config: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    embedded: EmbeddedModel | None = None


@dataclass(frozen=True, eq=False)
class Architecture:
    """One architecture a plugin supports.

    :param model_type: ``config.model_type`` this declaration claims (``"llama"``, ...).
    :param roles: module classes per role.
    :param projections: names of the linear layers inside attention and MLP modules.
    :param load: what ``corept.load`` applies (:class:`~corept.registry.quirks.LoadPolicy`).
    :param numerics: parameters of the shared components (:class:`~corept.registry.quirks.Numerics`).
    :param recorded: facts transformers applies itself (:class:`~corept.registry.quirks.Recorded`).
    :param transformers: PEP 440 specifier of the transformers versions the patches support;
        outside it the model loads unpatched with a logged reason.
    :param lora_targets: default LoRA target module names; ``None`` (default): every linear layer
        inside the attention and MLP modules of the model at hand.
    :param keep: ``{component: reason}`` for components that keep transformers' implementation.
    :param models: known checkpoints (:class:`KnownModel`): aliases, configs for the planner.
    :param gguf: how the architecture is written as GGUF (:class:`GGUFExport`); ``None``: it cannot be.
    :param priority: breaks ties when two plugins claim one model_type (higher wins); equal
        priorities are a conflict.
    :param notes: free text shown by ``corept inspect`` and the report.
    """

    model_type: str
    roles: ModuleRoles
    projections: Projections = field(default_factory=Projections)
    load: LoadPolicy = field(default_factory=LoadPolicy)
    numerics: Numerics = field(default_factory=Numerics)
    recorded: Recorded = field(default_factory=Recorded)
    transformers: str = ">=5.17"
    lora_targets: tuple[str, ...] | None = None
    keep: Mapping[str, str] = field(default_factory=dict)
    models: tuple[KnownModel, ...] = ()
    gguf: GGUFExport | None = None
    priority: int = 0
    notes: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.keep) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"{self.model_type}: keep names unknown components {sorted(unknown)}; known: {COMPONENTS}")
        for component, reason in self.keep.items():
            if not isinstance(reason, str) or not reason.strip():
                raise ValueError(f"{self.model_type}: keep[{component!r}] needs a reason (a non-empty string)")
        object.__setattr__(self, "keep", dict(self.keep))
        object.__setattr__(self, "models", tuple(self.models))
        if self.lora_targets is not None:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @property
    def components(self) -> tuple[str, ...]:
        """The components corept patches for this architecture: all but :attr:`keep`, and but
        ``experts`` where no experts class is declared (a dense model has none to patch)."""
        return tuple(c for c in COMPONENTS if c not in self.keep and (c != "experts" or self.roles.experts))

    @property
    def aliases(self) -> dict[str, str]:
        """``{alias: repo id}`` over :attr:`models`."""
        return {a: m.repo_id for m in self.models for a in m.aliases}

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "roles": {f.name: list(getattr(self.roles, f.name)) for f in fields(ModuleRoles)},
            "projections": {f.name: getattr(self.projections, f.name) for f in fields(Projections)},
            "load": self.load.to_dict(), "numerics": self.numerics.to_dict(), "recorded": self.recorded.to_dict(),
            "transformers": self.transformers, "lora_targets": list(self.lora_targets) if self.lora_targets else None,
            "components": list(self.components), "keep": dict(self.keep), "aliases": self.aliases,
            "models": [m.repo_id for m in self.models], "gguf": self.gguf.to_dict() if self.gguf else None,
            "priority": self.priority, "notes": self.notes,
        }
