"""Gradient checkpointing per decoder layer, with the saved layer inputs offloaded to pinned CPU memory.

``use_gradient_checkpointing="corept"``: each decoder layer runs its forward without keeping
activations; its input hidden states ``[B, S, H]`` are copied to pinned host memory on a side
CUDA stream (overlapping the next layer's compute) and come back for the recompute in backward,
prefetched while the layer after it runs its backward (:mod:`corept.offload`). Device memory then
holds no per-layer activations at all, only the current layer's working set.

On CPU, or for short sequences where the copies cost more than they save, it is ordinary
checkpointing (the input stays where it is), with a log line.

Installed per instance: transformers' checkpointable layers call ``self._gradient_checkpointing_func``,
which corept sets on each layer instance (no class or global is changed).

Distributed engines. The recompute calls the layer (its ``__call__``, hooks included) inside
backward and back-propagates through it there, like torch's *reentrant* checkpointing. FSDP2's
hooks therefore re-gather the layer's shards for the recompute and reduce-scatter its gradients as
usual. DDP must be built with ``find_unused_parameters=False`` (or ``static_graph=True``): with
``True`` it sees no parameter in the forward graph, marks them all unused, and fails with "Expected
to mark a variable ready only once" when their gradients arrive (``corept train`` sets
``ddp_find_unused_parameters=False``; the HF Trainer's default for a peft model is ``True``).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

from corept.patching.compile import compiled_body
from corept.training.recompute_policy import AutoPolicy
from corept.training.offload import HostCopy, Kept

logger = logging.getLogger("corept")

MIN_OFFLOAD_TOKENS = 512  # below this, offloading costs more than the memory it frees


class OffloadedCheckpoint(torch.autograd.Function):
    """``fn(hidden, *rest)`` recomputed in backward from an offloaded copy of ``hidden``.

    Inputs: ``fn``, ``offload`` (bool), ``hidden`` ``[B, S, H]``, then other positional tensors
    (kept on device). Outputs: ``fn``'s tensor outputs. Gradients flow to ``hidden`` and, through
    the recompute, to every parameter ``fn`` uses.
    """

    @staticmethod
    def forward(ctx, fn: Callable, offload: bool, hidden: torch.Tensor, *rest):
        ctx.fn = fn
        ctx.rest = rest
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.saved_hidden = HostCopy(hidden) if offload else Kept(hidden)
        ctx.hidden_requires_grad = hidden.requires_grad
        with torch.no_grad():
            out = fn(hidden, *rest)
        return out

    @staticmethod
    def backward(ctx, *grads):
        saved, ctx.saved_hidden = ctx.saved_hidden, None
        hidden = saved.get().detach().requires_grad_(True)
        devices = [hidden.device] if hidden.is_cuda else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, hidden.device)
            with torch.enable_grad():
                out = ctx.fn(hidden, *ctx.rest)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        # Issued, not finished: the layer below's input now copies back while these kernels run,
        # and (in allocation order) after this layer's temporaries were freed.
        saved.prefetch_previous()
        return (None, None, hidden.grad) + (None,) * len(ctx.rest)


def _layer_of(function) -> torch.nn.Module | None:
    """The decoder layer a checkpointed ``partial(forward, layer, ...)`` (or ``partial(layer.__call__)``) runs."""
    if isinstance(function, functools.partial):
        if function.args and isinstance(function.args[0], torch.nn.Module):
            return function.args[0]
        return getattr(function.func, "__self__", None)
    return None


def make_checkpoint_func(offload: bool, policy: AutoPolicy | None = None) -> Callable:
    """A ``_gradient_checkpointing_func`` for transformers' checkpointable layers.

    Called as ``func(partial(forward, self, **kwargs), hidden_states, *more_args)``. With a
    ``policy`` (``"auto"`` mode), calls whose batch shape it keeps run without checkpointing.
    """

    def checkpoint_func(function: Callable, hidden: torch.Tensor, *args: Any):
        function = compiled_body(function)  # a compiled layer's body, when transformers checkpoints inside forward
        if not torch.is_grad_enabled():
            # nothing to recompute for: sampling in training mode (TRL's GRPO generates so) would
            # otherwise pay the policy, RNG snapshots and autograd plumbing per layer per token
            return function(hidden, *args)
        if policy is not None and torch.is_tensor(hidden) and policy.keep(hidden, _layer_of(function)):
            return function(hidden, *args)
        if not torch.is_tensor(hidden):
            return torch.utils.checkpoint.checkpoint(function, hidden, *args, use_reentrant=False)
        tokens = hidden.numel() // hidden.shape[-1]
        do_offload = offload and hidden.is_cuda and tokens >= MIN_OFFLOAD_TOKENS
        return OffloadedCheckpoint.apply(function, do_offload, hidden, *args)

    checkpoint_func.corept_checkpointing = True  # how the report tells corept's function from transformers'
    checkpoint_func.corept_policy = policy
    return checkpoint_func


def enable_checkpointing(model: torch.nn.Module, mode: str | bool, memory_budget_gib: float | None = None) -> str:
    """Turn on gradient checkpointing for every checkpointable layer of ``model``.

    :param mode: ``"auto"`` (per batch shape: keep the activations when the planner says they fit
        ``memory_budget_gib``, else ``"corept"``; :mod:`corept.training.recompute_policy`),
        ``"corept"`` (offload layer inputs to pinned CPU memory on CUDA), ``True`` (ordinary
        non-reentrant checkpointing) or ``False`` (off).
    :returns: a description for logs and reports.
    """
    if mode is False or mode is None:
        return "off"
    if mode not in (True, "auto", "corept", "unsloth"):
        raise ValueError(f"use_gradient_checkpointing must be 'auto', 'corept', True or False, got {mode!r}")
    if memory_budget_gib is not None and mode != "auto":
        raise ValueError(f"memory_budget_gib applies to use_gradient_checkpointing='auto' only (got {mode!r})")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    disable_reinstall(base)
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable(**({"activation_checkpointing_kwargs": {"use_reentrant": False}}
              if enable.__name__ == "activation_checkpointing_enable"
              else {"gradient_checkpointing_kwargs": {"use_reentrant": False}}))
    if mode is True:
        return "standard (non-reentrant)"
    # Whether a layer input is offloaded is decided per call (CUDA input, >= MIN_OFFLOAD_TOKENS), so a
    # model loaded on CPU and moved to its GPU later (FSDP sharding, accelerate) still offloads.
    on_gpu = any(p.is_cuda for p in base.parameters()) or torch.cuda.is_available()
    policy = AutoPolicy(model, memory_budget_gib) if mode == "auto" else None
    func = make_checkpoint_func(offload=True, policy=policy)
    n = _install(base, func)
    _reinstall_on_enable(base, func)
    if not on_gpu:
        logger.info("corept: checkpointing on CPU: ordinary recompute, no offload (%d layers)", n)
        return "corept (CPU: ordinary recompute)"
    logger.info("corept: offloaded checkpointing on %d layers (inputs to pinned CPU memory for sequences "
                ">= %d tokens)", n, MIN_OFFLOAD_TOKENS)
    return f"corept offloaded ({n} layers)"


def _install(base: torch.nn.Module, func: Callable) -> int:
    """Set ``func`` on every checkpointable layer of ``base`` that has checkpointing on."""
    n = 0
    for m in base.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = func
            n += 1
    return n


#: transformers' methods that (re-)enable checkpointing and reset each layer's function.
_ENABLE_METHODS = ("gradient_checkpointing_enable", "activation_checkpointing_enable")


def _reinstall_on_enable(base: torch.nn.Module, func: Callable) -> None:
    """Keep corept's function when checkpointing is switched off and on again on this instance.

    TRL's DPO/KTO reference pass runs inside ``disable_gradient_checkpointing``, which calls
    ``gradient_checkpointing_disable()`` and then ``gradient_checkpointing_enable(...)``: transformers
    then puts its own checkpoint function back on every layer. An instance attribute wraps each
    enable method so corept's function is installed again after it (the class is untouched;
    :func:`disable_reinstall` removes the wrappers).
    """
    for name in _ENABLE_METHODS:
        method = getattr(type(base), name, None)
        if method is None:
            continue

        def enable_again(*args, _method=method, **kwargs):
            out = _method(base, *args, **kwargs)
            _install(base, func)
            return out

        enable_again.corept_checkpointing = True
        base.__dict__[name] = enable_again


def disable_reinstall(base: torch.nn.Module) -> None:
    """Remove the instance wrappers of :func:`_reinstall_on_enable` (no-op if absent)."""
    for name in _ENABLE_METHODS:
        if getattr(base.__dict__.get(name), "corept_checkpointing", False):
            del base.__dict__[name]
