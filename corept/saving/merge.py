"""Merged weights: the base model with its LoRA adapters added, written as safetensors.

Merging dequantizes 4-bit (and 8-bit) bases and adds ``scaling * B @ A`` in float32 before casting.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from corept.components.experts_4bit import logical_shape
from corept.lora.param_wrappers import factors, is_param_wrapper, wrapper_chain

SHARD_SIZE = "5GB"


def _dequantized(weight: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    state = getattr(weight, "quant_state", None)
    if state is None:
        if weight.dtype == torch.int8:  # LLM.int8: per-row scales on the weight, or on the module once it ran
            scb = getattr(weight, "SCB", None)
            if scb is None:
                scb = getattr(getattr(module, "state", None), "SCB", None)
            if scb is None:
                raise ValueError("8-bit weight without its scales (SCB): cannot dequantize it")
            return weight.float() * scb.float().unsqueeze(1) / 127.0
        return weight.detach().float()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, state).float()


def merged_items(model: nn.Module, dtype: torch.dtype, *,
                 cpu: bool = True) -> Iterator[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """``(key, shape, make)`` for every weight of the merged model, without computing any: ``make()``
    returns that weight (of ``shape``) with every active LoRA adapter merged in, as a ``dtype``
    tensor (on CPU when ``cpu``, else where the weight lives). Callers that stream (the GGUF export)
    hold one at a time.

    Keys are the plain transformers names (no ``base_model.model.`` or ``.base_layer`` parts).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    place = (lambda t: t.cpu()) if cpu else (lambda t: t)
    lora_modules = {name: m for name, m in base.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}

    def merged(m: nn.Module) -> torch.Tensor:
        bl = m.get_base_layer()
        w = _dequantized(bl.weight, bl)
        if not getattr(m, "merged", False) and not getattr(m, "disable_adapters", False):
            for adapter in m.active_adapters:
                if adapter in m.lora_A:
                    a = m.lora_A[adapter].weight.detach().float()
                    b = m.lora_B[adapter].weight.detach().float()
                    w = w + m.scaling[adapter] * (b @ a).to(w.device)
        return place(w.to(dtype))

    wrappers = {name: m for name, m in lora_modules.items() if is_param_wrapper(m)}
    for name, m in wrappers.items():  # peft's LoRA on parameters (stacked experts): one module, every tensor
        if name.endswith(".base_layer"):
            continue  # a nested wrapper: its outermost one yields the module
        yield from _wrapped_items(name, m, dtype, place)
    for name, m in lora_modules.items():
        if name in wrappers:
            continue
        yield f"{name}.weight", logical_shape(m.get_base_layer().weight), (lambda m=m: merged(m))
        bias = getattr(m.get_base_layer(), "bias", None)
        if bias is not None:
            yield f"{name}.bias", tuple(bias.shape), (lambda b=bias: place(b.detach().to(dtype)))
    skip = tuple(f"{n}." for n in lora_modules)
    for key, t in base.state_dict(keep_vars=True).items():
        if key.startswith(skip) or ".lora_" in key:
            continue
        owner = (base.get_submodule(key.rsplit(".", 1)[0]) if "." in key else base) if key.endswith(".weight") else None
        weight = getattr(owner, "weight", None)  # (a Linear4bit's quant-state keys are not weights)
        if weight is not None and (hasattr(weight, "quant_state") or weight.dtype == torch.int8):
            yield key, logical_shape(weight), (lambda w=weight, o=owner: place(_dequantized(w, o).to(dtype)))
        elif getattr(t, "quant_state", None) is not None:  # a 4-bit parameter of no Linear4bit (NF4 experts)
            yield key, logical_shape(t), (lambda t=t: place(_dequantized(t).to(dtype)))
        elif torch.is_floating_point(t) and not any(s in key for s in ("absmax", "quant_map", "quant_state", "SCB")):
            yield key, tuple(t.shape), (lambda t=t: place(t.detach().to(dtype)))


def _wrapped_items(name: str, outer: nn.Module, dtype: torch.dtype, place):
    """``(key, shape, make)`` for every tensor of the module under the peft ``ParamWrapper`` chain
    ``outer``: each wrapped parameter with its active adapters added (``scaling * B_e @ A_e`` per
    expert, in float32, in the parameter's own layout), the others (biases) as they are."""
    chain, inner = wrapper_chain(outer)
    by_param = {w.parameter_name: w for w in chain}

    def merged(w: nn.Module, param: torch.Tensor) -> torch.Tensor:
        out = _dequantized(param)  # NF4 experts (corept.components.experts_4bit) too
        if not getattr(w, "merged", False) and not getattr(w, "disable_adapters", False):
            for adapter in w.active_adapters:
                if adapter in w.lora_A:
                    a, b, scaling = factors(w, adapter)
                    delta = (b.detach().float() @ a.detach().float()) * scaling  # [E, out, in] as applied
                    if not w._did_swap_in_out_features:  # peft's flag: the parameter is stored [E, in, out]
                        delta = delta.transpose(1, 2)
                    out = out + delta.reshape(out.shape).to(out.device)
        return place(out.to(dtype))

    for pname, param in inner.named_parameters(recurse=False):
        key = f"{name}.{pname}"
        if pname in by_param:
            yield key, logical_shape(param), (lambda w=by_param[pname], t=param: merged(w, t))
        else:
            yield key, logical_shape(param), (lambda t=param: place(_dequantized(t).to(dtype)))


def merged_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base model's weights with every active LoRA adapter merged in, as ``dtype`` tensors on CPU
    (:func:`merged_items`, computed)."""
    return {key: make() for key, _, make in merged_items(model, dtype)}


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the output head shares the input embedding's weight (then only the embedding is written)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(model.config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


def _untied(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if tied_embeddings(model):
        sd = dict(sd)
        for key in [k for k in sd if k.endswith("lm_head.weight")]:
            sd.pop(key)
    return sd


def save_merged(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    write_weights(model, merged_state_dict(model, dtype), folder, dtype)


def write_weights(model: nn.Module, sd: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype) -> None:
    """Write ``sd`` (transformers names) as safetensors shards + ``model``'s config (no quantization) to ``folder``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    sd = _untied(model, sd)
    split = split_torch_state_dict_into_shards(sd, max_shard_size=SHARD_SIZE)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: sd[k].contiguous() for k in keys}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.__class__.from_dict(base.config.to_dict())
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype merged weights default to: the 4-bit compute dtype, else the first float parameter's."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    q = getattr(base.config, "quantization_config", None)
    if q is not None:
        d = q.get("bnb_4bit_compute_dtype") if isinstance(q, dict) else getattr(q, "bnb_4bit_compute_dtype", None)
        if isinstance(d, str):
            d = getattr(torch, d)
        if isinstance(d, torch.dtype):
            return d
    for p in base.parameters():
        if torch.is_floating_point(p) and p.dtype != torch.uint8:
            return p.dtype
    return torch.float32


def save_merged_4bit(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """The merged model re-quantized to NF4 by bitsandbytes (staged as merged 16-bit next to ``folder``)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # beside the staging folder, named so an interrupted save's next save removes it (fileset.recover)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".corept-staging-merged16-") as staging:
        save_merged(model, Path(staging), dtype)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
        merged = AutoModelForCausalLM.from_pretrained(staging, quantization_config=q, dtype=dtype,
                                                      device_map=device_map)
        merged.save_pretrained(folder, safe_serialization=True)
