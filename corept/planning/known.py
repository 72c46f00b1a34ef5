"""The model configs plugins declare (``KnownModel.config``), so ``corept plan`` answers offline.

Only the fields that shape memory are declared (sizes, heads, vocabulary, tying, rope). A local
folder or a cached download of the same name always wins over these copies; the plan says which
one it used. Names match case-insensitively, with or without the organisation prefix, and
instruct / base / pre-quantized variants map to the base config (same shapes).
"""
from __future__ import annotations

_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit", "-instruct", "-base")


def known_configs() -> dict[str, dict]:
    """``{repo id: config dict (with model_type)}`` over every loaded plugin's declared models."""
    from corept.registry.manager import get_plugin_manager

    return {m.repo_id: {"model_type": arch.model_type, **m.config}
            for arch, _ in get_plugin_manager().declarations() for m in arch.models if m.config}


def known_config(name: str) -> tuple[str, dict] | None:
    """``(canonical name, config dict)`` for a declared model name, or ``None``.

    ``unsloth/<Model>-Instruct`` and ``<Model>-bnb-4bit`` resolve to ``<org>/<Model>``'s config.
    """
    configs = known_configs()
    index = {}
    for full in configs:
        index[full.lower()] = full
        index[full.split("/", 1)[1].lower()] = full
    key = str(name).strip().lower()
    for _ in range(6):
        if key in index:
            return index[key], dict(configs[index[key]])
        if "/" in key:
            key = key.split("/", 1)[1]
            continue
        stripped = next((key[: -len(s)] for s in _SUFFIXES if key.endswith(s)), None)
        if stripped is None:
            return None
        key = stripped
    return None
