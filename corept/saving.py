"""``corept.save``: LoRA adapters or merged weights, safetensors only, written atomically.

Every method writes into a temporary folder beside the target and renames it into place at the
end, so an interrupted save leaves the previous save intact (and never a half-written folder at
``path``). Merging dequantizes 4-bit bases and adds ``scaling * B @ A`` in float32 before casting.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from corept.errors import InvalidOptionsError

logger = logging.getLogger("corept")
METHODS = ("lora", "merged_16bit", "merged_4bit")
SHARD_SIZE = "5GB"


@contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        backup = None
        if path.exists():
            backup = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, backup)
        os.replace(tmp, path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def merged_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base model's weights with every active LoRA adapter merged in, as ``dtype`` tensors on CPU.

    Keys are the plain transformers names (no ``base_model.model.`` or ``.base_layer`` parts).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, torch.Tensor] = {}
    lora_modules = {name: m for name, m in base.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    for name, m in lora_modules.items():
        bl = m.get_base_layer()
        w = _dequantized(bl.weight, bl)
        if not getattr(m, "merged", False) and not getattr(m, "disable_adapters", False):
            for adapter in m.active_adapters:
                if adapter in m.lora_A:
                    a = m.lora_A[adapter].weight.detach().float()
                    b = m.lora_B[adapter].weight.detach().float()
                    w = w + m.scaling[adapter] * (b @ a)
        out[f"{name}.weight"] = w.to(dtype).cpu()
        if getattr(bl, "bias", None) is not None:
            out[f"{name}.bias"] = bl.bias.detach().to(dtype).cpu()
    skip = tuple(f"{n}." for n in lora_modules)
    for key, t in base.state_dict().items():
        if key.startswith(skip) or ".lora_" in key:
            continue
        owner = base.get_submodule(key.rsplit(".", 1)[0]) if "." in key else base
        weight = getattr(owner, "weight", None) if key.endswith(".weight") else None
        if weight is not None and (hasattr(weight, "quant_state") or weight.dtype == torch.int8):
            out[key] = _dequantized(weight, owner).to(dtype).cpu()
        elif torch.is_floating_point(t) and not any(s in key for s in ("absmax", "quant_map", "quant_state", "SCB")):
            out[key] = t.detach().to(dtype).cpu()
    return out


def _untied(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(model.config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)):
        sd = dict(sd)
        for key in [k for k in sd if k.endswith("lm_head.weight")]:
            sd.pop(key)
    return sd


def _save_merged(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
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


def _compute_dtype(model: nn.Module) -> torch.dtype:
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


def save(model: nn.Module, tokenizer, path: str | os.PathLike, method: str = "lora", *,
         dtype: torch.dtype | None = None) -> Path:
    """Save ``model`` (and ``tokenizer``) to ``path``.

    :param method: ``"lora"`` (adapter weights + config), ``"merged_16bit"`` (a plain transformers
        folder with the adapters merged; from a 4-bit base the weights are dequantized and merged
        in fp32), or ``"merged_4bit"`` (the merged model re-quantized to NF4 by bitsandbytes).
    :param dtype: dtype of merged weights; default the model's compute dtype.
    :returns: the folder written.
    """
    if method not in METHODS:
        raise InvalidOptionsError(f"save method {method!r} unknown; use one of {METHODS}")
    if method == "lora" and not hasattr(model, "peft_config"):
        raise InvalidOptionsError("method='lora' needs a peft model (corept.get_peft_model); for a fully "
                                  "fine-tuned model use method='merged_16bit'.")
    dtype = dtype or _compute_dtype(model)
    with atomic_folder(path) as tmp:
        if method == "lora":
            model.save_pretrained(tmp, safe_serialization=True)
        elif method == "merged_16bit":
            _save_merged(model, tmp, dtype)
        else:
            _save_merged_4bit(model, tmp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "corept_save.json").write_text(json.dumps({"method": method, "dtype": str(dtype)}))
    logger.info("corept: saved %s to %s", method, path)
    return Path(path)


def _save_merged_4bit(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".merged16-") as staging:
        _save_merged(model, Path(staging), dtype)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
        merged = AutoModelForCausalLM.from_pretrained(staging, quantization_config=q, dtype=dtype,
                                                      device_map=device_map)
        merged.save_pretrained(folder, safe_serialization=True)
