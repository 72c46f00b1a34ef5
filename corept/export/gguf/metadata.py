"""GGUF metadata: the sizes every decoder writes, RoPE scaling, and the plugin's declared extras.

RoPE: transformers 5 keeps it in ``config.rope_parameters`` (per layer type for models that mix
sliding and full attention; the full-attention entry is the main one, the sliding one becomes
``rope.freq_base_swa``). ``default`` needs nothing more; ``linear`` and ``yarn`` become
``rope.scaling.*`` keys; the types a plugin lists in ``GGUFExport.rope_freq_factors`` (Llama 3's)
become llama.cpp's ``rope_freqs`` tensor (one divisor per frequency, read from the model's own
rotary module so it is exactly what transformers computes). Other RoPE types are refused before any
work.
"""
from __future__ import annotations

from typing import Any

import torch

from corept.errors import InvalidOptionsError
from corept.registry.quirks import FromConfig

ROPE_TYPES = ("default", "linear", "yarn")


def rope_parameters(config) -> tuple[dict, dict | None]:
    """(main, sliding or None) RoPE parameter dicts of a (text) config."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params or "sliding_attention" in params:
        return dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {}) or None
    if not params and getattr(config, "rope_theta", None) is not None:
        params = {"rope_type": "default", "rope_theta": config.rope_theta}
    return dict(params), None


def check_rope(config, export) -> None:
    main, _ = rope_parameters(config)
    kind = main.get("rope_type", main.get("type", "default"))
    known = ROPE_TYPES + export.rope_freq_factors
    if kind not in known:
        raise InvalidOptionsError(f"RoPE type {kind!r} cannot be written to GGUF for llama.cpp's {export.arch!r}; "
                                  f"supported: {', '.join(known)}")


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _value(writer, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        (writer.add_uint32 if value >= 0 else writer.add_int32)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise InvalidOptionsError(f"GGUF metadata {key!r}: cannot store a {type(value).__name__}")


def write_metadata(writer, export, config, model) -> dict[str, torch.Tensor]:
    """Write the architecture keys for ``config`` (the text config); returns extra tensors the file
    needs (``rope_freqs.weight`` for llama3 RoPE), already in GGUF layout."""
    hd = head_dim(config)
    heads = int(config.num_attention_heads)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    eps = getattr(config, "rms_norm_eps", None)
    if eps is not None:
        writer.add_layer_norm_rms_eps(float(eps))
    writer.add_vocab_size(int(config.vocab_size))
    main, sliding = rope_parameters(config)
    factor = float(main.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
    writer.add_rope_dimension_count(int(hd * factor))
    if main.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(main["rope_theta"]))
    if sliding and sliding.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    extra = _rope_scaling(writer, main, export, model, int(hd * factor))
    for key, value in export.metadata.items():
        value = value.read(config) if isinstance(value, FromConfig) else value
        if value is not None:
            _value(writer, f"{export.arch}.{key}", value)
    return extra


def _rope_scaling(writer, params: dict, export, model, dims: int) -> dict[str, torch.Tensor]:
    import gguf

    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        original = params.get("original_max_position_embeddings")
        if original:
            writer.add_rope_scaling_orig_ctx_len(int(original))
    elif kind in export.rope_freq_factors:
        inv = _inv_freq(model)
        base = 1.0 / (float(params["rope_theta"]) ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims))
        if inv is None or inv.numel() != base.numel():
            raise InvalidOptionsError(f"{kind} RoPE: the model's rotary module (inv_freq) was not found")
        return {"rope_freqs.weight": (base / inv.double()).float()}
    return {}


def _inv_freq(model) -> torch.Tensor | None:
    for name, buf in model.named_buffers():
        if name.rsplit(".", 1)[-1] == "inv_freq":
            return buf.detach().float().cpu()
    return None
