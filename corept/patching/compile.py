"""Each decoder layer of one model as a ``torch.compile`` region, with an eager fallback.

Why: an eager step of a short-row batch is host-bound (Python issues a layer's ~200 ops and
Triton launches more slowly than the GPU runs them); one compiled region per layer issues its
graph instead. corept's kernels enter the graph as custom operators (``corept_kernels.ops``),
so a layer compiles without graph breaks, fused LoRA paths and 4-bit bases included.

How, per instance (nothing process-wide): ``nn.Module.__call__`` runs a module's
``_compiled_call_impl`` when it is set, so corept sets that instance attribute on every decoder
layer to a :class:`CompiledCall` of ``torch.compile(layer._call_impl)``, recorded as a patch
change (``corept.unpatch`` removes it).

Checkpointing. transformers before 5.2x checkpoints a layer's ``__call__`` from outside, so the
compiled call is what checkpointing runs and recomputes. Newer releases checkpoint inside the
class's ``forward`` (a wrapper that calls the layer's checkpoint function with
``partial(body, layer, ...)``), i.e. inside ``_call_impl``; corept's offloaded checkpoint cannot
be traced (host copies, RNG state), so while it is active the layer's outer call stays eager and
the checkpoint function runs the compiled *body* instead (:func:`compiled_body`), in the forward
pass and in the recompute. transformers' own (traceable) checkpoint is compiled as part of the
region.

Shapes: ``dynamic=None`` (torch's automatic dynamic shapes): the first call compiles for its
shapes; a second sequence length recompiles once with symbolic sizes, and later lengths reuse it.
The layers share one compiled graph (their parameters are graph inputs), plus one per distinct
layer kind (e.g. sliding-window layers), and one each for grad and no-grad calls (checkpointing's
first pass).

Failure: if compiling (or running the compiled code) raises where eager succeeds, every layer of
the model goes back to eager, with one warning line and the reason in ``corept.report``'s
``settings["compile"]``. An error that eager raises too is the caller's and propagates as it is.
Compilation of the backward graph happens at the first backward; a failure there propagates.

Switch: ``corept.load(..., compile=True)`` or ``COREPT_COMPILE=1`` turns it on; ``compile=False`` or
``COREPT_COMPILE=0`` keeps it off; a dict gives ``torch.compile`` arguments (e.g.
``{"backend": "aot_eager"}``, how the CPU tests run it). Default (``None``): off, until an 8B GPU
run with every layer compiled shows it pays (docs/compile.md: the GPU runs so far compiled at most
8 of 32 layers, see :mod:`corept.patching.sharing`).
"""
from __future__ import annotations

import functools
import logging
import os
import sys

import torch
import torch.nn as nn

from corept.errors import InvalidOptionsError
from corept.patching.state import Change, PatchState

logger = logging.getLogger("corept")

ENV = "COREPT_COMPILE"
SETTING = "compile"
ATTR = "_compiled_call_impl"


def choose(option, model: nn.Module) -> tuple[dict | None, str]:
    """``(torch.compile kwargs or None for off, why)`` from the ``compile=`` option and ``COREPT_COMPILE``."""
    if not (option is None or isinstance(option, (bool, dict))):
        raise InvalidOptionsError(f"compile must be None (automatic), True, False or a dict of torch.compile "
                                  f"arguments; got {option!r}")
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("0", "false", "off", "no"):
        return None, f"off ({ENV}={os.environ[ENV]})"
    if option is False:
        return None, "off (compile=False)"
    if isinstance(option, dict):
        return dict(option), "on (compile=" + repr(option) + ")"
    if option is True or env in ("1", "true", "on", "yes"):
        return {}, "on (compile=True)" if option is True else f"on ({ENV}={os.environ[ENV]})"
    # Off by default until a GPU run with every layer compiled is measured (module notes, docs/compile.md)
    return None, "off (default; compile=True or COREPT_COMPILE=1 turns it on)"


class _Shared:
    """What the compiled layers of one model share: whether compilation failed, and why."""

    def __init__(self, state: PatchState, description: str):
        self.state, self.failed = state, None
        state.settings[SETTING] = description

    def fail(self, exc: BaseException) -> None:
        if self.failed is None:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "TORCHDYNAMO_VERBOSE" not in ln]
            self.failed = f"{type(exc).__name__}: {' '.join(lines)[:300]}"
            self.state.settings[SETTING] = f"fell back to eager: {self.failed}"
            logger.warning("corept: compiling the decoder layers failed (%s); the model runs eagerly "
                           "(corept.load(..., compile=False) or %s=0 skips compiling)", self.failed, ENV)


def _guarded(shared: _Shared, compiled, eager, *args, **kwargs):
    """``compiled(*args, **kwargs)``; ``eager`` after a failure of the compiler (logged once)."""
    if shared.failed is not None:
        return eager(*args, **kwargs)
    try:
        return compiled(*args, **kwargs)
    except (KeyboardInterrupt, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        out = eager(*args, **kwargs)  # raises the caller's own error, if it is one
        shared.fail(exc)
        return out


def _checkpoints_inside(layer: nn.Module) -> bool:
    """Whether ``layer``'s corept checkpoint runs inside its ``_call_impl`` now (newer transformers:
    the class ``forward`` checkpoints; older ones override ``__call__`` instead)."""
    func = getattr(layer, "_gradient_checkpointing_func", None)
    return (type(layer).__call__ is nn.Module.__call__ and getattr(layer, "gradient_checkpointing", False)
            and layer.training and torch.is_grad_enabled() and getattr(func, "corept_checkpointing", False))


class CompiledCall:
    """A decoder layer's ``_compiled_call_impl``: its compiled call, or eager after a failure (or
    while corept's checkpoint runs inside it, which then runs :attr:`body`)."""

    def __init__(self, layer: nn.Module, shared: _Shared, kwargs: dict):
        self.layer, self.shared, self.kwargs = layer, shared, kwargs
        self.compiled = torch.compile(layer._call_impl, **kwargs)
        self.bodies: dict = {}

    def __call__(self, *args, **kwargs):
        if _checkpoints_inside(self.layer):
            return self.layer._call_impl(*args, **kwargs)
        return _guarded(self.shared, self.compiled, self.layer._call_impl, *args, **kwargs)

    def body(self, fn):
        """``fn`` (the layer's forward body, unbound) compiled, with the same fallback."""
        if fn not in self.bodies:
            self.bodies[fn] = torch.compile(fn, **self.kwargs)
        compiled = self.bodies[fn]
        return lambda *args, **kwargs: _guarded(self.shared, compiled, fn, *args, **kwargs)


def compiled_body(function):
    """For a checkpoint function's ``function`` (``partial(forward, layer, ...)``, as newer
    transformers passes it): the same call with ``forward`` compiled when ``layer`` is a compiled
    corept layer; else ``function`` unchanged."""
    if not (isinstance(function, functools.partial) and function.args and isinstance(function.args[0], nn.Module)):
        return function
    call = function.args[0].__dict__.get(ATTR)
    if not isinstance(call, CompiledCall):
        return function
    return functools.partial(call.body(function.func), *function.args, **function.keywords)


def compile_layers(model: nn.Module, state: PatchState, layers: list[nn.Module], option) -> str:
    """Compile each of ``layers`` (``model``'s decoder layers) per :func:`choose`; record the
    changes in ``state`` and return the report line."""
    kwargs, why = choose(option, model)
    if kwargs is None or not layers:
        state.settings[SETTING] = why if layers else "off (no decoder layer found)"
        return state.settings[SETTING]
    backend = kwargs.get("backend", "inductor")
    shared = _Shared(state, f"{len(layers)} decoder layers, one region each ({backend}; {why})")
    for layer in layers:
        change = Change(module=layer)
        change.set(ATTR, CompiledCall(layer, shared, kwargs))
        state.changes.append(change)
    return state.settings[SETTING]
