"""Reading a model folder, with errors that name the file and what to do.

transformers' own errors for a corrupt ``config.json``, an unknown ``model_type`` or a truncated
safetensors file are tracebacks (the last does not name the file); a weight missing from the
checkpoint is initialised at random with a load report on stdout. Here each becomes a
:class:`~corept.errors.CheckpointError` naming the file, or a warning in corept's words (an
error with ``strict=True``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from corept.errors import CheckpointError

logger = logging.getLogger("corept")


def read_config(folder: Path, *, trust_remote_code: bool):
    """``AutoConfig.from_pretrained(folder)`` with the file and the cause named on failure."""
    import transformers
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore the file or save the model again") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:
        if "recognize this architecture" in str(exc) or "Unrecognized model" in str(exc):
            raise CheckpointError(
                f"{path} names model_type {model_type!r}, which transformers {transformers.__version__} does not "
                f"know: upgrade transformers, or pass trust_remote_code=True if the model ships its own code") from exc
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def _broken_safetensors(folder: Path) -> tuple[Path, Exception] | None:
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key)
        except Exception as exc:  # noqa: BLE001 - the file is what we report
            return file, exc
    return None


def load_weights(model_class, folder: Path, config, kwargs: dict, *, strict: bool):
    """``model_class.from_pretrained(folder, config=config, **kwargs)``; a corrupt safetensors file is
    named, and missing or unexpected weights are reported (refused with ``strict``)."""
    try:
        model, info = model_class.from_pretrained(folder, config=config, output_loading_info=True, **kwargs)
    except Exception as exc:
        broken = _broken_safetensors(folder)
        if broken is not None:
            file, cause = broken
            raise CheckpointError(f"{file} is not a readable safetensors file ({type(cause).__name__}: {cause}): "
                                  f"it is truncated or corrupt; download or save the model again") from exc
        raise
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) the model needs are not in the checkpoint and were initialised "
                        f"at random: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} weight(s) in the checkpoint belong to no module and were ignored: "
                        f"{', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
    if problems:
        text = f"{folder}: " + "; ".join(problems)
        if strict:
            raise CheckpointError(text + " (strict=True refuses such a checkpoint)")
        logger.warning("corept: %s. Check that the checkpoint matches its config (strict=True refuses it).", text)
    return model
