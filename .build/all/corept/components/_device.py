"""Which implementation a kernel-backed replacement will run on a model's device."""
from __future__ import annotations

import torch.nn as nn
from corept_kernels import capabilities


def model_device(model: nn.Module):
    for p in model.parameters():
        return p.device
    return "cpu"


def implementation(kernel: str, model: nn.Module) -> tuple[str, str | None]:
    """``("triton:<kernel>", None)`` or ``("torch:<kernel>", reason)`` for the model's device."""
    ok, reason = capabilities.can_run(kernel, model_device(model))
    return (f"triton:{kernel}", None) if ok else (f"torch:{kernel}", reason)
