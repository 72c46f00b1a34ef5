"""Turn a model name into a local folder: local path, plugin alias, HF cache, or the hub."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from corept.errors import ModelNotFoundError

logger = logging.getLogger("corept")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model_path(name: str, *, revision: str | None = None, token: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Resolve ``name`` to a folder holding ``config.json``.

    Tried in order: an existing local folder; a plugin-declared alias (resolved again); the HF
    cache (works offline); the hub, unless ``HF_HUB_OFFLINE`` is set. When offline (or the hub
    fails) a model a plugin declares as embedded in an installed package loads from that copy.

    :returns: ``(folder, how)`` where ``how`` says which route found it.
    :raises ModelNotFoundError: with what was tried and how to fix it.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but holds no config.json; point corept.load at the "
                                     f"folder written by save_pretrained (or corept.save).")
        return path.resolve(), "local folder"
    # Hub ids are "org/name" and often hold dots ("org/Model-3.1-8B", aliases like "model-2.5-7b"),
    # so a suffix does not make a path; a leading ./ / ~ or a second "/" does.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"{name!r} looks like a path but no such folder exists.")

    from corept.registry.manager import get_plugin_manager

    alias = get_plugin_manager().alias_target(name)
    if alias is not None and alias[0] != name:
        target, rec = alias
        logger.info("corept: %r is an alias of %r (declared by plugin %r)", name, target, rec.name)
        folder, how = resolve_model_path(target, revision=revision, token=token, cache_dir=cache_dir)
        return folder, f"alias of {target} ({how})"

    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        folder = snapshot_download(name, revision=revision, token=token, cache_dir=cache_dir,
                                   local_files_only=True, allow_patterns=patterns)
        if (Path(folder) / "config.json").is_file():
            return Path(folder), "HF cache"
    except Exception as exc:  # noqa: BLE001 - a cache miss is reported below with its cause
        cache_error = exc
    else:
        cache_error = FileNotFoundError("config.json missing in the cached snapshot")
    if offline():
        embedded = embedded_copy(name)
        if embedded is not None:
            return embedded
        raise ModelNotFoundError(
            f"{name!r} is not a local folder, not a plugin alias and not in the HF cache "
            f"({type(cache_error).__name__}), and HF_HUB_OFFLINE is set so the hub is not asked. "
            f"Download it once online (huggingface-cli download {name}) or pass a local folder.")
    try:
        folder = snapshot_download(name, revision=revision, token=token, cache_dir=cache_dir,
                                   allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - surfaced with advice
        embedded = embedded_copy(name)
        if embedded is not None:
            logger.warning("corept: could not fetch %r from the hub (%s); using its embedded copy", name,
                           type(exc).__name__)
            return embedded
        raise ModelNotFoundError(f"could not fetch {name!r} from the hub: {type(exc).__name__}: "
                                 f"{str(exc).rstrip('. ')}. Check the id and your network; for a gated repo, "
                                 f"accept its terms on the hub and log in (huggingface-cli login, or set HF_TOKEN)."
                                 ) from exc
    return Path(folder), "hub"


def embedded_copy(name: str) -> tuple[Path, str] | None:
    """``(folder, how)`` of a plugin-declared embedded copy of ``name`` (weights shipped in a Python
    package, dequantized from GGUF), or ``None`` when no installed package carries one."""
    from corept.loading.embedded import declared

    for emb in declared():
        if emb.model.repo_id.lower() == name.lower():
            folder = emb.folder()
            if folder is not None:
                return folder, f"embedded copy ({emb.model.embedded.package} package, GGUF {emb.model.embedded.filename})"
    return None
