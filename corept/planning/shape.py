"""What the planner knows about a model, read from its config alone (no weights are loaded).

The model is instantiated on the ``meta`` device with transformers' own classes, so parameter
counts are exact for any architecture transformers knows, with no per-architecture formula:

* ``n_params``: unique parameters (tied embeddings counted once);
* quantizable weights: every ``nn.Linear`` weight bitsandbytes would quantize (all but the
  modules transformers keeps in 16 bit: the output embedding and the last module), with their
  count of 256-block groups for double-quant statistics;
* LoRA targets: the plugin's declared target names present in the model (what
  ``corept.get_peft_model(target_modules="all-linear")`` picks), else peft's "all-linear" (every
  Linear but the output embedding); ``lora_params(r) = sum over targets of r * (in + out)``;
* one decoder layer's structure (:class:`LayerShape`) for the activation formulas.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from corept.errors import CoreptError


class PlanError(CoreptError):
    """The planner cannot answer: unreadable config, not a causal LM, nothing fits..."""


@dataclass(frozen=True)
class Linear:
    """One ``nn.Linear``: full module name, last name component, shape, bias."""

    name: str
    short: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class LayerShape:
    """The first decoder layer, as the activation formulas see it.

    :param norms: ``[H]``-sized norms in the layer (each saves its own ``[N, H]`` input).
    :param qk_norm: per-head norms on q and k (qwen3, gemma3).
    :param linears: the layer's Linears by last name (``q_proj``, ``gate_proj``, ...).
    :param attention: attention implementation (``sdpa``, ``eager``, ...; ``varlen`` for an eager model whose
        attention corept patches: its varlen kernel saves what FlashAttention saves).
    :param attn_softcap: attention-logit softcapping (one more saved score matrix when eager).
    :param standard: q/k/v/o projections and a gated gate/up/down MLP were found; otherwise the
        formulas are an approximation.
    """

    norms: int
    qk_norm: bool
    linears: dict = field(default_factory=dict)
    attention: str = "sdpa"
    attn_softcap: bool = False
    standard: bool = True


@dataclass(frozen=True)
class ModelShape:
    """Sizes and parameter counts of one model (see the module docstring)."""

    name: str
    source: str
    model_type: str
    plugin: str | None
    patched: bool
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int | None
    tied: bool
    n_params: int
    n_quantized: int
    n_quant_tensors: int
    n_quant_groups: int
    linears: tuple[Linear, ...]
    lora_targets: tuple[str, ...]
    layer: LayerShape
    force_float32: bool = False
    notes: tuple[str, ...] = ()
    expert_lora_unit: int = 0
    #: mixture of experts (0 on dense models): experts per layer, experts per token (top-k), one
    #: expert's width, and whether the gate is transformers' default SwiGLU (corept's kernel saves
    #: only its input) or the module's own elementwise gate (gpt-oss's clamp saves more)
    experts: int = 0
    experts_per_token: int = 0
    expert_width: int = 0
    expert_default_gate: bool = True

    @property
    def n_unquantized(self) -> int:
        """Parameters that stay 16-bit under 4-bit loading (embeddings, lm_head, norms, biases)."""
        return self.n_params - self.n_quantized

    @property
    def head_params(self) -> int:
        """Parameters of the output embedding (the loss's ``[V, H]`` weight)."""
        return self.vocab * self.hidden

    def lora_params(self, r: int) -> int:
        """Trainable LoRA parameters at rank ``r``: ``sum r * (in + out)`` over the targets, plus
        ``r * E * (in + out)`` per stacked expert weight (:attr:`expert_lora_unit`: LoRA on experts,
        what ``corept.get_peft_model`` targets by default)."""
        linear = sum(r * (lin.in_features + lin.out_features) for lin in self.linears if lin.short in self.lora_targets)
        return linear + r * self.expert_lora_unit

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "model_type": self.model_type, "plugin": self.plugin,
                "patched": self.patched, "hidden": self.hidden, "intermediate": self.intermediate,
                "layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "vocab": self.vocab, "max_positions": self.max_positions, "tied_embeddings": self.tied,
                "n_params": self.n_params, "n_quantized": self.n_quantized, "lora_targets": list(self.lora_targets),
                "attention": self.layer.attention, "notes": list(self.notes)}


def load_config(model, *, trust_remote_code: bool = False):
    """``(config, name, source)`` from a name/path, a ``PretrainedConfig`` or a config dict.

    A name is looked up as: a local folder or ``.json`` file, a plugin alias, the HF cache
    (``config.json`` only), a built-in copy (:mod:`corept.planning.known`), a copy embedded in an
    installed package (converted once), and last the hub —
    ``config.json`` alone, never weights, and not at all with ``HF_HUB_OFFLINE`` set.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model, getattr(model, "_name_or_path", "") or model.model_type, "config object"
    if isinstance(model, dict):
        d = dict(model)
        if "model_type" not in d:
            raise PlanError("a config dict needs a 'model_type' key (as in the model's config.json).")
        try:
            return AutoConfig.for_model(d.pop("model_type"), **d), model.get("_name_or_path", "config dict"), "config dict"
        except Exception as exc:  # noqa: BLE001 - surfaced with the cause
            raise PlanError(f"cannot build a config from the dict: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, str) or not model.strip():
        raise PlanError(f"model must be a name, a folder, a config.json path, a config or a dict; got {model!r}")
    found = _config_file(model)
    if isinstance(found[1], dict):  # a built-in copy: (canonical name, config dict)
        name, d = found
        return AutoConfig.for_model(d.pop("model_type"), **d), name, f"built-in copy of {name}'s config"
    path, how = found
    if path.name == "config.json":  # a model folder's: the loader's reader names the file and the fix
        from corept.errors import CheckpointError
        from corept.loading.checkpoint import read_config

        try:
            return read_config(path.parent, trust_remote_code=trust_remote_code), model, f"{how}: {path}"
        except CheckpointError as exc:
            raise PlanError(f"cannot read the config of {model!r}: {exc}") from exc
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - unreadable / invalid config.json
        raise PlanError(f"cannot read the config of {model!r} ({path}): {type(exc).__name__}: {exc}") from exc
    return config, model, f"{how}: {path}"


def _config_file(name: str, depth: int = 0):
    """``(path, how)`` of ``name``'s config, or ``(canonical, dict)`` for a built-in copy."""
    from pathlib import Path

    from corept.planning.known import known_config
    from corept.loading.names import embedded_copy, offline

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"cannot read the config of {name!r}: the folder holds no config.json.")
        return path / "config.json", "local folder"
    if path.is_file():
        return path, "config file"
    if path.suffix == ".json" or name.startswith((".", "/", "~")):
        raise PlanError(f"cannot read the config of {name!r}: no such file or folder.")
    from corept.registry.manager import get_plugin_manager

    alias = get_plugin_manager().alias_target(name)
    if alias is not None and alias[0] != name and depth < 3:
        return _config_file(alias[0], depth + 1)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, "config.json", local_files_only=True)), "HF cache"
    except Exception:  # noqa: BLE001 - not cached (or not a repo id): try the built-ins, then the hub
        pass
    known = known_config(name)
    if known is not None:
        return known
    embedded = embedded_copy(name)
    if embedded is not None:
        return embedded[0] / "config.json", embedded[1]
    if offline():
        raise PlanError(f"cannot read the config of {name!r}: not a local folder or file, not a plugin alias, "
                        f"not in the HF cache and not built in, and HF_HUB_OFFLINE is set. Pass a folder or "
                        f"config.json, or download it once: huggingface-cli download {name} config.json")
    try:
        return Path(hf_hub_download(name, "config.json")), "hub (config.json only)"
    except Exception as exc:  # noqa: BLE001 - surfaced with the cause
        raise PlanError(f"cannot read the config of {name!r}: {type(exc).__name__}: {str(exc).rstrip('. ')}. Check the "
                        f"id and your network; for a gated repo accept its terms on the hub and log in "
                        f"(huggingface-cli login, or set HF_TOKEN).") from exc


_CACHE: dict = {}


def model_shape(model, *, trust_remote_code: bool = False) -> "ModelShape":
    """The :class:`ModelShape` of ``model`` (name/path, config or dict); cached per config."""
    config, name, source = load_config(model, trust_remote_code=trust_remote_code)
    key = (json.dumps(config.to_dict(), sort_keys=True, default=str), name, source, trust_remote_code)
    if key not in _CACHE:
        if len(_CACHE) >= 32:
            _CACHE.clear()
        _CACHE[key] = _inspect(config, name, source, trust_remote_code)
    return _CACHE[key]


def _meta_model(config, trust_remote_code: bool):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - e.g. a vision-only or encoder config
        raise PlanError(f"model_type {config.model_type!r} does not build as a causal LM with transformers "
                        f"{transformers.__version__}: {type(exc).__name__}: {exc}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)


def _unquantized_modules(model) -> set[str]:
    """Module names bitsandbytes leaves in 16 bit (transformers' own rule when available)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        return set(get_keys_to_not_convert(model))
    except Exception:  # noqa: BLE001 - older/newer transformers: the same rule, written out
        out = model.get_output_embeddings()
        keep = {n for n, m in model.named_modules() if out is not None and m is out}
        keep.add(list(model.named_parameters())[-1][0].rsplit(".", 1)[0])
        return keep


def _decoder_layers(model, n_layers: int):
    import torch.nn as nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    return lists[0] if lists else None


def _as_linear(name: str, m) -> Linear | None:
    """A :class:`Linear` for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 style ``[in, out]``)."""
    import torch.nn as nn

    if isinstance(m, nn.Linear):
        return Linear(name, name.rsplit(".", 1)[-1], m.in_features, m.out_features, m.bias is not None)
    if type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2:
        return Linear(name, name.rsplit(".", 1)[-1], m.weight.shape[0], m.weight.shape[1], m.bias is not None)
    return None


def _layer_shape(layer, text, attention: str, attn_softcap: bool) -> LayerShape:
    H, hd = text.hidden_size, _head_dim(text)
    linears, norms, qk = {}, 0, False
    for name, m in layer.named_modules():
        short = name.rsplit(".", 1)[-1]
        lin = _as_linear(name, m)
        if lin is not None:
            linears[short] = lin
        elif "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
            if m.weight.numel() == H:
                norms += 1
            elif m.weight.numel() == hd and short in ("q_norm", "k_norm"):
                qk = True
    standard = all(p in linears for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return LayerShape(norms=norms or 2, qk_norm=qk, linears=linears, attention=attention,
                      attn_softcap=attn_softcap, standard=standard)


def _experts(model, arch) -> list:
    """The model's stacked experts modules (classes in ``arch.roles.experts``) with a 3-D
    ``gate_up_proj``, else ``[]``."""
    if arch is None or not arch.roles.experts:
        return []
    classes = set(arch.roles.experts)
    return [m for m in model.modules() if type(m).__name__ in classes
            and getattr(getattr(m, "gate_up_proj", None), "dim", lambda: 0)() == 3]


def _head_dim(text) -> int:
    hd = getattr(text, "head_dim", None)
    return int(hd) if hd else text.hidden_size // text.num_attention_heads


def _inspect(config, name: str, source: str, trust_remote_code: bool) -> ModelShape:
    from corept.lora.setup import default_targets
    from corept.registry.resolution import resolve

    text = config.get_text_config()
    model = _meta_model(config, trust_remote_code)
    notes = []
    arch = resolve(config, warn=False)
    patched = bool(arch) and arch.supported
    if arch is None:
        notes.append(f"no corept plugin for {config.model_type!r}: transformers' unpatched forwards save more; "
                     f"activation figures are a conservative approximation")
    elif not patched:
        notes.append(f"plugin {arch.plugin} does not support this transformers version: the model trains "
                     f"unpatched; activation figures are a conservative approximation")
    attention = (arch.load.forced_attn_implementation if arch else None) or \
        getattr(model.config, "_attn_implementation", None) or "sdpa"
    if attention == "eager" and patched and "attention" in arch.components:
        attention = "varlen"  # corept's attention takes eager models' unpadded calls (its varlen kernel)
    softcap = bool(arch and arch.recorded.attn_softcap)
    n_params = sum(p.numel() for p in model.parameters())
    skip = _unquantized_modules(model)
    linears, n_q, n_qt, n_groups = [], 0, 0, 0
    for mname, m in model.named_modules():
        lin = _as_linear(mname, m)
        if lin is None:
            continue
        linears.append(lin)
        if not any(mname == s or mname.startswith(s + ".") for s in skip):
            n = lin.numel
            n_q, n_qt, n_groups = n_q + n, n_qt + 1, n_groups + math.ceil(n / 64 / 256)
    present = {lin.short for lin in linears}
    out_emb = model.get_output_embeddings()
    out_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if out_emb is not None and m is out_emb}
    declared = default_targets(model, arch) if arch is not None else "all-linear"
    targets = tuple(t for t in declared if t in present) if declared != "all-linear" else ()
    if not targets:
        targets = tuple(sorted(present - out_names))
    layers = _decoder_layers(model, text.num_hidden_layers)
    if layers is None:
        raise PlanError(f"cannot find the {text.num_hidden_layers} decoder layers of {config.model_type!r}")
    layer = _layer_shape(layers[0], text, attention, softcap)
    if not layer.standard:
        notes.append("decoder layer is not q/k/v/o attention + gated MLP (e.g. MoE experts): activation "
                     "figures are an approximation")
    inter = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    experts, expert_unit, moe = _experts(model, arch), 0, {}
    if experts:
        # dropless routing (transformers' MoE): every token reaches top-k experts, so a layer's routed
        # rows are N * k of the expert's width; no capacity factor drops or pads any
        gate_up = experts[0].gate_up_proj
        width = (gate_up.shape[2] if getattr(experts[0], "is_transposed", False) else gate_up.shape[1]) // 2
        inter = width * getattr(text, "num_experts_per_tok", 1)
        gate = getattr(type(experts[0]), "_apply_gate", None)
        moe = dict(experts=gate_up.shape[0], experts_per_token=getattr(text, "num_experts_per_tok", 1),
                   expert_width=width, expert_default_gate=getattr(gate, "__qualname__", "") == "_default_apply_gate")
        expert_unit = sum(w.shape[0] * (w.shape[1] + w.shape[2]) for m in experts
                          for w in m.parameters(recurse=False) if w.dim() == 3)
        notes.append(f"mixture of experts: routed activations as {getattr(text, 'num_experts_per_tok', 1)} "
                     f"experts of width {width} per token; LoRA on the stacked expert weights counted")
        if patched:  # corept.load(..., load_in_4bit=True) stores the experts it serves in NF4 as well
            for w in (w for m in experts for w in m.parameters(recurse=False) if w.dim() == 3):
                n_q, n_qt, n_groups = n_q + w.numel(), n_qt + 1, n_groups + math.ceil(w.numel() / 64 / 256)
            notes.append("QLoRA: the stacked expert weights are NF4 too (corept quantizes them at load)")
    elif not layer.standard and getattr(text, "moe_intermediate_size", None):
        inter = text.moe_intermediate_size * getattr(text, "num_experts_per_tok", 1)
    emb = model.get_input_embeddings()
    tied = out_emb is not None and emb is not None and out_emb.weight is emb.weight
    max_pos = getattr(text, "max_position_embeddings", None)
    return ModelShape(
        name=name, source=source, model_type=config.model_type, plugin=arch.plugin if arch else None,
        patched=patched, hidden=text.hidden_size, intermediate=int(inter), layers=text.num_hidden_layers,
        heads=text.num_attention_heads, kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        head_dim=_head_dim(text), vocab=text.vocab_size, max_positions=int(max_pos) if max_pos else None, tied=tied,
        n_params=n_params, n_quantized=n_q, n_quant_tensors=n_qt, n_quant_groups=n_groups,
        linears=tuple(linears), lora_targets=targets, layer=layer,
        force_float32=bool(arch and arch.load.force_float32), notes=tuple(notes), expert_lora_unit=expert_unit,
        **moe)

