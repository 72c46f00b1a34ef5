"""What ``corept train`` checks and guards so a run loses nothing and says what it did.

* :func:`check_writable`: the output folder is writable (a probe file created and removed) before
  the model loads, so an impossible ``--output`` costs seconds, not a training run.
* :func:`epochs_warning`: a ``--max-steps`` far beyond the data says how many epochs that is.
* :func:`no_telemetry`: third-party telemetry (TRL's trainers report their use to the Hugging Face
  hub through ``huggingface_hub.send_telemetry``) is off for the run unless
  ``COREPT_ALLOW_TELEMETRY=1``.
* :func:`remove_stale`: with ``--overwrite``, the previous run's corept saves this run does not
  replace (a ``merged/`` beside a new adapter-only run) are removed, so the folder and ``run.json``
  agree.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from corept.errors import InvalidOptionsError

logger = logging.getLogger("corept")

#: more epochs than this, implied by --max-steps, get a warning
MANY_EPOCHS = 20


def check_writable(out: Path) -> None:
    """Create ``out`` if needed and write and remove a probe file in it.

    :raises InvalidOptionsError: naming the folder and the cause.
    """
    probe = out / f".corept-write-probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("corept checks that it can write here before training\n")
        probe.unlink()
    except OSError as exc:
        raise InvalidOptionsError(f"--output {out}: cannot write there ({exc.strerror or exc}); choose a folder "
                                  f"you can write to") from exc


def epochs_warning(max_steps: int | None, rows: int, per_step_rows: int) -> str | None:
    """A warning when ``max_steps`` optimizer steps of ``per_step_rows`` rows each would go over
    ``rows`` more than :data:`MANY_EPOCHS` times, else ``None``."""
    if not max_steps or rows <= 0:
        return None
    epochs = max_steps * per_step_rows / rows
    if epochs <= MANY_EPOCHS:
        return None
    return (f"--max-steps {max_steps} with {per_step_rows} rows per step is {epochs:,.0f} epochs of these {rows} "
            f"rows (every row seen {epochs:,.0f} times): the model will memorise them; use --epochs or fewer steps")


@contextlib.contextmanager
def no_telemetry():
    """Third-party telemetry off while the block runs (``COREPT_ALLOW_TELEMETRY=1`` keeps it on)."""
    if os.environ.get("COREPT_ALLOW_TELEMETRY", "") not in ("", "0"):
        yield
        return
    from huggingface_hub import constants

    before_env, before_const = os.environ.get("HF_HUB_DISABLE_TELEMETRY"), constants.HF_HUB_DISABLE_TELEMETRY
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    constants.HF_HUB_DISABLE_TELEMETRY = True  # read at call time by huggingface_hub.send_telemetry
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_TELEMETRY = before_const
        if before_env is None:
            os.environ.pop("HF_HUB_DISABLE_TELEMETRY", None)
        else:
            os.environ["HF_HUB_DISABLE_TELEMETRY"] = before_env


def remove_stale(out: Path, written: set[str]) -> list[str]:
    """Remove corept's saves in ``out``'s ``adapter/``, ``merged/`` and ``gguf/`` that this run did not write."""
    from corept.saving import remove

    removed = []
    for name in ("adapter", "merged", "gguf"):
        if name not in written and remove(out / name):
            removed.append(name)
            logger.warning("corept: removed %s/ of the previous run in %s (this run does not write it)", name, out)
    return removed
