"""Gradient checkpointing per decoder layer, with the saved layer inputs offloaded to pinned CPU memory.

``use_gradient_checkpointing="corept"``: each decoder layer runs its forward without keeping
activations; its input hidden states ``[B, S, H]`` are copied to pinned host memory on a side
CUDA stream (overlapping the next layer's compute) and come back for the recompute in backward.
Device memory then holds no per-layer activations at all, only the current layer's working set.

On CPU, or for short sequences where the copies cost more than they save, it is ordinary
checkpointing (the input stays where it is), with a log line.

Installed per instance: transformers' checkpointable layers call ``self._gradient_checkpointing_func``,
which corept sets on each layer instance (no class or global is changed).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

logger = logging.getLogger("corept")

MIN_OFFLOAD_TOKENS = 512  # below this, offloading costs more than the memory it frees


class _Offloaded:
    """A tensor whose data was sent to pinned host memory; ``get()`` brings it back."""

    _stream: torch.cuda.Stream | None = None

    def __init__(self, t: torch.Tensor):
        self.device, self.dtype, self.requires_grad = t.device, t.dtype, t.requires_grad
        if _Offloaded._stream is None:
            _Offloaded._stream = torch.cuda.Stream(device=t.device)
        side = _Offloaded._stream
        self.host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        side.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(side):
            self.host.copy_(t, non_blocking=True)
            t.record_stream(side)  # keep the device buffer alive until the copy has run
        self.done = torch.cuda.Event()
        self.done.record(side)

    def get(self) -> torch.Tensor:
        torch.cuda.current_stream(self.device).wait_event(self.done)
        return self.host.to(self.device, non_blocking=True)


class _Kept:
    def __init__(self, t: torch.Tensor):
        self.t = t

    def get(self) -> torch.Tensor:
        return self.t


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
        ctx.saved_hidden = _Offloaded(hidden) if offload else _Kept(hidden)
        ctx.hidden_requires_grad = hidden.requires_grad
        with torch.no_grad():
            out = fn(hidden, *rest)
        return out

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.saved_hidden.get().detach().requires_grad_(True)
        ctx.saved_hidden = None
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
        return (None, None, hidden.grad) + (None,) * len(ctx.rest)


def make_checkpoint_func(offload: bool) -> Callable:
    """A ``_gradient_checkpointing_func`` for transformers' checkpointable layers.

    Called as ``func(partial(forward, self, **kwargs), hidden_states, *more_args)``.
    """

    def checkpoint_func(function: Callable, hidden: torch.Tensor, *args: Any):
        if not torch.is_tensor(hidden):
            return torch.utils.checkpoint.checkpoint(function, hidden, *args, use_reentrant=False)
        tokens = hidden.numel() // hidden.shape[-1]
        do_offload = offload and hidden.is_cuda and tokens >= MIN_OFFLOAD_TOKENS
        return OffloadedCheckpoint.apply(function, do_offload, hidden, *args)

    return checkpoint_func


def enable_checkpointing(model: torch.nn.Module, mode: str | bool) -> str:
    """Turn on gradient checkpointing for every checkpointable layer of ``model``.

    :param mode: ``"corept"`` (offload layer inputs to pinned CPU memory on CUDA), ``True``
        (ordinary non-reentrant checkpointing) or ``False`` (off).
    :returns: a description for logs and reports.
    """
    if mode is False or mode is None:
        return "off"
    if mode not in (True, "corept", "unsloth"):
        raise ValueError(f"use_gradient_checkpointing must be 'corept', True or False, got {mode!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable(**({"activation_checkpointing_kwargs": {"use_reentrant": False}}
              if enable.__name__ == "activation_checkpointing_enable"
              else {"gradient_checkpointing_kwargs": {"use_reentrant": False}}))
    if mode is True:
        return "standard (non-reentrant)"
    on_gpu = any(p.is_cuda for p in base.parameters())
    func = make_checkpoint_func(offload=on_gpu)
    n = 0
    for m in base.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = func
            n += 1
    if not on_gpu:
        logger.info("corept: checkpointing on CPU: ordinary recompute, no offload (%d layers)", n)
        return "corept (CPU: ordinary recompute)"
    logger.info("corept: offloaded checkpointing on %d layers (inputs to pinned CPU memory for sequences "
                ">= %d tokens)", n, MIN_OFFLOAD_TOKENS)
    return f"corept offloaded ({n} layers)"
