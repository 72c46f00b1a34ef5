"""What each kernel can do, and the one rule that picks its Triton path or its torch twin per call.

A kernel is registered once, next to its implementation, with :func:`register`. Every public
kernel function (and every inner piece that chooses per call between a Triton kernel and torch
code) asks :func:`dispatch` which function to run on its arguments; it answers the Triton path or
the pure-torch reference twin, the latter with a one-line reason. It refuses the Triton path when

* :func:`reference_only` is active (patch-time probes run the twins);
* the tensors' device cannot run it (the first tensor's; all must be on CUDA or all off it): CUDA
  can, CPU only under ``TRITON_INTERPRET=1`` (and only when the kernels were built for the
  interpreter), other devices not; a kernel may declare further device types its own path runs
  on natively (:attr:`KernelInfo.devices`);
* the call is traced by ``torch.compile`` and the kernel has no compiled form (inside a traced
  region a compile-safe kernel answers :attr:`KernelInfo.compiled_fn`, its custom-operator form);
* the kernel has no backward and a tensor needs a gradient;
* the kernel's eligibility predicate rejects the arguments (dtypes, shape limits, empty tensors).

:func:`can_run` answers the device-level part alone (callers label reports with it).
"""
from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import triton

#: The dtypes the Triton kernels load and store.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

REFERENCE_ONLY_REASON = "reference_only() is active"


@dataclass(frozen=True)
class KernelInfo:
    """Declaration of one kernel.

    :param name: registry name, e.g. ``"rms_norm"``.
    :param triton_fn: the Triton-backed function (differentiable when ``has_backward``).
    :param reference_fn: the pure-torch twin with the same signature and semantics.
    :param has_backward: the Triton path implements its own backward. Pieces that run inside
        another kernel's forward or backward (never differentiated) declare ``False``.
    :param compiled_fn: the form taken inside ``torch.compile`` (same signature): torch custom
        operators (``torch.library``) with fake functions and registered autograd, so Dynamo
        records them without a graph break (:mod:`corept_kernels.ops`). ``None``: the torch twin
        runs there. ``compile_safe`` is true exactly when it is set; the kernels' tests prove
        every such kernel traces without a break and matches eager.
    :param devices: device types the kernel's own path runs on natively: ``("cuda",)`` for a
        Triton kernel; a composite path whose Triton pieces dispatch on their own (the LoRA
        functions) adds ``"cpu"``. CPU tensors also take the Triton path under the interpreter.
    :param eligibility: ``eligibility(*args, **options) -> str | None``, called by
        :func:`dispatch` with its arguments: why the Triton path cannot take them, or ``None``.
    :param notes: one line for reports.
    """

    name: str
    triton_fn: Callable
    reference_fn: Callable
    has_backward: bool = True
    compiled_fn: Callable | None = None
    devices: tuple[str, ...] = ("cuda",)
    eligibility: Callable[..., str | None] | None = None
    notes: str = ""

    @property
    def compile_safe(self) -> bool:
        """Whether the kernel runs inside ``torch.compile`` regions (through :attr:`compiled_fn`)."""
        return self.compiled_fn is not None

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


@triton.jit
def _probe():
    pass


# ``@triton.jit`` picks the interpreter when it decorates: kernels built without it cannot launch
# on CPU even if the variable is set later (Triton then fails with "0 active drivers").
_BUILT_FOR_INTERPRETER = type(_probe).__name__ == "InterpretedFunction"

_REFERENCE_ONLY: ContextVar[bool] = ContextVar("corept_kernels_reference_only", default=False)


@torch.compiler.assume_constant_result
def _reference_only_active() -> bool:
    # Dynamo cannot trace ``ContextVar.get``: it runs this once per trace and bakes the answer in
    # (a region compiled outside reference_only() keeps its kernels inside one; documented there)
    return _REFERENCE_ONLY.get()


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Within this block :func:`dispatch` answers every kernel's torch twin.

    Context-local (a ``ContextVar``: other threads and asyncio tasks are unaffected), nestable, and
    restored on exit, exceptions included. :func:`can_run` ignores it: it describes the device.
    A ``torch.compile`` region reads it when it is traced, not on each later call.
    """
    token = _REFERENCE_ONLY.set(True)
    try:
        yield
    finally:
        _REFERENCE_ONLY.reset(token)


def _device_reason(info: KernelInfo, dev: str) -> str | None:
    if dev in info.devices:
        return None
    if dev == "cpu":
        if not interpreter_active():
            return f"{info.name}: CPU tensors need TRITON_INTERPRET=1 for Triton; using the torch twin"
        if not _BUILT_FOR_INTERPRETER:
            return (f"{info.name}: TRITON_INTERPRET=1 was set after corept_kernels was imported; its "
                    "kernels were built without the interpreter")
        return None
    return f"{info.name}: Triton kernel does not run on {dev}"


def can_run(name: str, device: torch.device | str, *, needs_backward: bool = True,
            under_compile: bool = False) -> tuple[bool, str]:
    """Whether the Triton path of ``name`` can run on ``device`` (arguments aside).

    :returns: ``(True, "")`` or ``(False, reason)``, the reason fit for a log line.
    """
    info = get(name)
    if needs_backward and not info.has_backward:
        return False, f"{name}: Triton kernel has no backward"
    if under_compile and not info.compile_safe:
        return False, f"{name}: Triton kernel is not torch.compile-safe"
    reason = _device_reason(info, torch.device(device).type)
    return (False, reason) if reason else (True, "")


def _refusal(info: KernelInfo, args: tuple, options: dict) -> str | None:
    # every call of every kernel comes here: plain loops and ``is_cuda`` (``.device`` costs ~0.6 us)
    first, needs_grad = None, False
    for a in args:
        if isinstance(a, torch.Tensor):
            if first is None:
                first = a
            elif a.is_cuda != first.is_cuda:
                return f"{info.name}: tensors both on and off CUDA"
            needs_grad = needs_grad or a.requires_grad
    if first is None:
        raise ValueError(f"dispatch({info.name!r}) needs at least one tensor argument")
    if info.compiled_fn is None and torch.compiler.is_compiling():
        return f"{info.name}: Triton kernel is not torch.compile-safe"
    if not info.has_backward and needs_grad and torch.is_grad_enabled():
        return f"{info.name}: Triton kernel has no backward"
    reason = _device_reason(info, "cuda" if first.is_cuda else first.device.type)
    if reason is None and info.eligibility is not None:
        why = info.eligibility(*args, **options)
        reason = None if why is None else f"{info.name}: {why}"
    return reason


def dispatch(name: str, *args, **options) -> tuple[Callable, str]:
    """The function to run for kernel ``name`` on these arguments: ``(triton_fn, "")`` (its
    ``compiled_fn`` while ``torch.compile`` traces) or ``(reference_fn, reason)``.

    :param args: the call's tensors (``None`` allowed) and whatever else the kernel's eligibility
        predicate reads; the device is the first tensor's.
    :param options: passed to the eligibility predicate.
    """
    info = get(name)
    if _reference_only_active():
        return info.reference_fn, REFERENCE_ONLY_REASON
    reason = _refusal(info, args, options)
    if reason:
        return info.reference_fn, reason
    if info.compiled_fn is not None and torch.compiler.is_compiling():
        return info.compiled_fn, ""
    return info.triton_fn, ""


def unsupported_tensors(*tensors: torch.Tensor | None, dtypes: tuple = KERNEL_DTYPES) -> str | None:
    """The common eligibility check: why these tensors (``None`` skipped) cannot go to a Triton
    kernel (an empty or 0-d tensor, a dtype outside ``dtypes``), or ``None``."""
    for t in tensors:
        if t is None:
            continue
        if t.numel() == 0 or t.dim() == 0:
            return f"{'empty' if t.dim() else '0-d'} tensor {tuple(t.shape)}"
        if t.dtype not in dtypes:
            return f"dtype {t.dtype} (Triton path takes {', '.join(str(d) for d in dtypes)})"
    return None
