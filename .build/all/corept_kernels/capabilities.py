"""What each kernel can do, so callers can fall back to its torch twin with a stated reason.

A kernel is registered once, next to its implementation, with :func:`register`. Callers ask
:func:`select` for the function to use on a given tensor; it answers the Triton kernel when it can
run there and the pure-torch reference twin otherwise, together with the reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class KernelInfo:
    """Declaration of one kernel.

    :param name: public name, e.g. ``"rms_norm"``.
    :param triton_fn: the differentiable Triton-backed function.
    :param reference_fn: the pure-torch twin with the same signature and semantics.
    :param has_backward: the Triton path implements its own backward.
    :param compile_safe: safe to call inside ``torch.compile`` regions.
    :param devices: device types the Triton path runs on (``"cuda"``; ``"cpu"`` only through the
        Triton interpreter, which :func:`interpreter_active` reports).
    """

    name: str
    triton_fn: Callable
    reference_fn: Callable
    has_backward: bool = True
    compile_safe: bool = False
    devices: tuple[str, ...] = ("cuda",)
    notes: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "has_backward": self.has_backward,
            "compile_safe": self.compile_safe,
            "devices": list(self.devices),
            "notes": self.notes,
        }


_REGISTRY: dict[str, KernelInfo] = {}


def register(info: KernelInfo) -> KernelInfo:
    """Add ``info`` to the registry (re-registering the same name replaces it)."""
    _REGISTRY[info.name] = info
    return info


def get(name: str) -> KernelInfo:
    """The declaration of kernel ``name``; ``KeyError`` lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown kernel {name!r}; known: {sorted(_REGISTRY)}") from None


def all_kernels() -> dict[str, KernelInfo]:
    """A copy of the registry: name -> declaration."""
    return dict(_REGISTRY)


def interpreter_active() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set, so Triton kernels can run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def can_run(name: str, device: torch.device | str, *, needs_backward: bool = True,
            under_compile: bool = False) -> tuple[bool, str]:
    """Whether the Triton path of ``name`` can run on ``device``.

    :returns: ``(True, "")`` or ``(False, reason)``, the reason fit for a log line.
    """
    info = get(name)
    dev = torch.device(device).type
    if needs_backward and not info.has_backward:
        return False, f"{name}: Triton kernel has no backward"
    if under_compile and not info.compile_safe:
        return False, f"{name}: Triton kernel is not torch.compile-safe"
    if dev == "cpu":
        if interpreter_active():
            return True, ""
        return False, f"{name}: CPU tensors need TRITON_INTERPRET=1 for Triton; using the torch twin"
    if dev not in info.devices:
        return False, f"{name}: Triton kernel does not run on {dev}"
    return True, ""


def select(name: str, device: torch.device | str, **kwargs) -> tuple[Callable, str]:
    """The function to call for ``name`` on ``device``: ``(fn, reason_for_fallback_or_"")``."""
    ok, reason = can_run(name, device, **kwargs)
    info = get(name)
    return (info.triton_fn, "") if ok else (info.reference_fn, reason)
