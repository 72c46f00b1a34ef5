"""Models whose weights ship inside a Python package, as plugins declare them (``KnownModel.embedded``).

The package carries a GGUF file; transformers reads it (through the ``gguf`` package) into a
dequantized float32 model, which is written once as a safetensors folder in corept's cache and
loaded from there afterwards (0.4 s instead of ~13 s for a 135M model). Nothing touches the network.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from corept.registry.declarations import KnownModel

logger = logging.getLogger("corept")


def cache_root() -> Path:
    """``$COREPT_CACHE`` or ``~/.cache/corept``."""
    return Path(os.environ.get("COREPT_CACHE", Path.home() / ".cache" / "corept"))


@dataclass(frozen=True)
class Embedded:
    """A declared embedded model: the checkpoint, the architecture declaring it, its plugin."""

    model: KnownModel
    model_type: str
    plugin: str

    @property
    def name(self) -> str:
        return self.model.repo_id.rsplit("/", 1)[-1]

    def gguf(self) -> Path | None:
        """The GGUF file inside the installed package, or ``None`` if the package is absent.

        The package is located, never imported (its ``__init__`` may import heavy dependencies).
        """
        try:
            spec = importlib.util.find_spec(self.model.embedded.package)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.model.embedded.filename
        return path if path.is_file() else None

    def folder(self) -> Path | None:
        """A safetensors folder of the model, converted on first use; ``None`` without the package."""
        target = cache_root() / "models" / self.name.lower()
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        gguf = self.gguf()
        if gguf is None:
            return None
        logger.warning("corept: converting %s to a safetensors folder in %s (once, ~15 s)", gguf.name, target)
        _convert(gguf, target)
        return target


def declared() -> list[Embedded]:
    """Every embedded model the loaded plugins declare, in plugin load order."""
    from corept.registry.manager import get_plugin_manager

    return [Embedded(m, arch.model_type, rec.name) for arch, rec in get_plugin_manager().declarations()
            for m in arch.models if m.embedded is not None]


def _convert(gguf: Path, target: Path) -> None:
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
