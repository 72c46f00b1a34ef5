"""Shared pieces of the GPU benchmarks: the case description and environment metadata."""
from __future__ import annotations

import datetime
import platform
import sys
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class BenchCase:
    """One kernel at one shape, with every implementation to compare.

    :param kernel: public kernel name, e.g. ``"rms_norm"``.
    :param shape: human-readable shape, e.g. ``"4x2048x4096 bf16"``.
    :param impls: implementation name (``"corept"``, ``"torch"``, ``"torch_compile"``, ``"liger"``)
        -> zero-argument callable running the forward and returning the output tensor (or a tuple
        of tensors). Inputs that need gradients must be created with ``requires_grad=True`` inside
        the case so the harness can run backward.
    :param backward: time forward+backward too.
    :param bytes_fwd: minimum bytes read+written by the forward (for memory-bound kernels).
    :param bytes_fwd_bwd: minimum bytes read+written by forward+backward.
    :param grad_inputs: the leaf tensors whose ``.grad`` must be cleared between runs.
    """

    kernel: str
    shape: str
    impls: dict[str, Callable]
    backward: bool = True
    bytes_fwd: int | None = None
    bytes_fwd_bwd: int | None = None
    grad_inputs: list = field(default_factory=list)
    memory_bound: bool = False


def environment() -> dict:
    """GPU name, library versions, date and command line for a results file."""
    import torch

    info = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    from importlib import metadata

    for mod, dist in (("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"), ("trl", "trl"),
                      ("bitsandbytes", "bitsandbytes"), ("liger_kernel", "liger-kernel"), ("unsloth", "unsloth")):
        try:
            info[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # absent packages are recorded as such
            info[mod] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["commit"] = source_commit()
    return info


def source_commit() -> str | None:
    """The corept commit the benchmark ran from: a ``COMMIT`` file at the tree's root (written when
    a snapshot is exported with ``git archive``), else ``git rev-parse HEAD``, else None."""
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parent.parent
    if (root / "COMMIT").is_file():
        return (root / "COMMIT").read_text().strip()
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
