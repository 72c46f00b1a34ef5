"""Patch-time proofs: a shared component replaces a forward only after reproducing it on a probe.

The replacement runs with ``corept_kernels.reference_only()`` (the kernels' torch twins: this
checks the math the declaration implies, not a kernel, and compiles nothing), the replaced forward
as it is, both under ``no_grad`` on a small random input in the module's own dtype and device.
The result is cached per module class in the resolved architecture, so a model with 80 layers
is probed once per class. A mismatch keeps transformers' forward with the reason, naming the
declared values the plugin should check.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
from corept_kernels import reference_only

from corept.patching.answers import Keep, Replacement

#: largest accepted ``max|got - want| / max|want|``: a structural error (a missing offset, another
#: activation, a dropped scale) is of order 1; rounding differences are ~1e-7 in fp32, a few
#: ulps (~1e-2) in bf16/fp16.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
HALF_TOLERANCE = 2e-2


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, HALF_TOLERANCE)


def scaled_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return float("inf")
    scale = want.abs().max().item() or 1.0
    err = (got - want).abs().max().item()
    return err / scale if err == err else float("inf")  # NaN -> inf


def generator(device) -> torch.Generator:
    """A private generator: probing never moves the global RNG (seeded training stays reproducible)."""
    return torch.Generator(device="cpu").manual_seed(1234)


def randn(*shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator(device), dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def float_param(module: nn.Module) -> torch.Tensor | None:
    """The first floating-point parameter of ``module`` (dtype and device of probe inputs)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p
    return None


def compute_dtype(module: nn.Module, model: nn.Module) -> torch.dtype:
    """The dtype activations have inside ``module`` (a 4-bit module's compute dtype)."""
    for m in module.modules():
        dt = getattr(m, "compute_dtype", None)
        if isinstance(dt, torch.dtype):
            return dt
    p = float_param(module)
    return p.dtype if p is not None else getattr(model, "dtype", torch.float32)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """``module`` and its descendants in eval mode (no dropout) for the probe; flags restored."""
    flags = [(m, m.training) for m in module.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def run(module: nn.Module, replacement: Replacement, inputs: tuple, *, what: str, hint: str) -> str | None:
    """Compare the module's forward with ``replacement.forward`` (positional style) on ``inputs``;
    ``None`` when they agree, else the reason."""
    cls = type(module).__name__
    try:
        with torch.no_grad(), eval_mode(module):
            want = module.forward(*inputs)
            with reference_only():
                got = replacement.forward(module, *inputs)
    except Exception as exc:  # noqa: BLE001 - any failure is a reason not to replace
        return f"{cls}: the {what} probe could not run ({type(exc).__name__}: {exc})"
    err = scaled_error(got, want)
    if err > tolerance(inputs[0].dtype):
        return (f"{cls}.forward is not reproduced by corept's {what} (probe error {err:.2g} > "
                f"{tolerance(inputs[0].dtype):g}); check the declared {hint}")
    return None


def proven(arch, key: tuple, prove: Callable[[], str | None]) -> str | None:
    """``prove()``'s result, computed once per ``key`` for this resolved architecture."""
    if key not in arch.probes:
        arch.probes[key] = prove()
    return arch.probes[key]


def checked(arch, component: str, module: nn.Module, replacement: Replacement, make_inputs: Callable[[], tuple],
            *, hint: str) -> Replacement | Keep:
    """``replacement`` if it reproduces ``module``'s forward on a probe (once per class), else a Keep."""
    p = float_param(module)
    if p is not None and p.device.type == "meta":
        return Keep(f"{type(module).__name__}: cannot prove the {component} replacement on meta tensors")
    key = (component, type(module))
    reason = proven(arch, key, lambda: run(module, replacement, make_inputs(), what=component, hint=hint))
    return replacement if reason is None else Keep(reason)
