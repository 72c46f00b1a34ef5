"""``corept.save``: LoRA adapters or merged weights, safetensors only, corept's files only.

Writes the set through :func:`corept.saving.fileset.file_set`: other files in the folder are left
alone, and an interrupted save leaves the previous one readable (the next save or load finishes or
removes what it left).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from corept.errors import InvalidOptionsError
from corept.saving.fileset import file_set
from corept.saving.merge import compute_dtype, save_merged, save_merged_4bit

logger = logging.getLogger("corept")
METHODS = ("lora", "merged_16bit", "merged_4bit", "gguf")
_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    raise InvalidOptionsError(f"save dtype {dtype!r} is not understood; use a torch dtype or one of {sorted(_DTYPE_NAMES)}")


def save(model: nn.Module, tokenizer, path: str | os.PathLike, method: str = "lora", *,
         dtype: torch.dtype | str | None = None, quantization: str | None = None) -> Path:
    """Save ``model`` (and ``tokenizer``) to ``path``, writing only corept's files there.

    :param method: ``"lora"`` (adapter weights + config), ``"merged_16bit"`` (a plain transformers
        folder with the adapters merged; from a 4-bit base the weights are dequantized and merged
        in fp32), ``"merged_4bit"`` (the merged model re-quantized to NF4 by bitsandbytes), or
        ``"gguf"`` (one ``<name>-<QUANT>.gguf`` file for llama.cpp / Ollama, merged in fp32, the
        tokenizer inside it; :mod:`corept.export.gguf`).
    :param dtype: dtype of merged weights (a torch dtype or ``"bf16"``/``"fp16"``/``"fp32"``);
        default the model's compute dtype. Not used by ``"gguf"``.
    :param quantization: for ``"gguf"`` only: ``"f16"``, ``"bf16"``, ``"q8_0"`` (default),
        ``"q4_k_m"``, ``"q5_k_m"`` or ``"q6_k"``.
    :returns: the folder written (for ``"gguf"``: the file written in it).
    """
    if method not in METHODS:
        raise InvalidOptionsError(f"save method {method!r} unknown; use one of {METHODS}")
    if method == "lora" and not hasattr(model, "peft_config"):
        raise InvalidOptionsError("method='lora' needs a peft model (corept.get_peft_model); for a fully "
                                  "fine-tuned model use method='merged_16bit'.")
    if quantization is not None and method != "gguf":
        raise InvalidOptionsError(f"quantization= is for method='gguf'; method {method!r} does not take it")
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise InvalidOptionsError(f"cannot save to {target}: it exists and is not a folder")
    if method == "gguf":
        return save_gguf(model, tokenizer, target, quantization or "q8_0")
    dtype = _dtype(dtype) or compute_dtype(model)
    with file_set(target, {"method": method, "dtype": str(dtype)}) as staging:
        if method == "lora":
            model.save_pretrained(staging, safe_serialization=True)
        elif method == "merged_16bit":
            save_merged(model, staging, dtype)
        else:
            save_merged_4bit(model, staging, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    logger.info("corept: saved %s to %s", method, target)
    return target


def save_gguf(model: nn.Module, tokenizer, target: Path, quantization: str, *, name: str | None = None) -> Path:
    """``corept.save(..., method="gguf")`` with an optional file name stem; returns the file written."""
    from corept.export.gguf.writer import prepare

    job = prepare(model, tokenizer, quantization, name=name)  # every refusal happens here, before any work
    with file_set(target, {"method": "gguf", "quantization": job.mix}) as staging:
        job.write(staging / job.filename)
    logger.info("corept: saved gguf (%s) to %s", job.mix, target / job.filename)
    return target / job.filename
