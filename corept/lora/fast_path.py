"""When a peft LoRA linear, or a group of them, can run on corept's fused LoRA kernels."""
from __future__ import annotations

import torch
from corept_kernels.lora import lora_fast_path_reason


#: below this many tokens a call without gradients keeps peft's forward (see :func:`is_training_call`)
SMALL_NO_GRAD_TOKENS = 128


def is_training_call(layer, x: torch.Tensor) -> bool:
    """Whether a call of ``layer`` on ``x`` (``[..., in]``) takes the fused LoRA path.

    Training mode, with gradients, or without them on at least :data:`SMALL_NO_GRAD_TOKENS` tokens.
    Checkpointing's first pass runs the layers under ``no_grad``: on peft's path it would hold fp32
    ``[N, out]`` adapter products (``N`` tokens; 56 KiB per token for an 8B MLP), which at long
    sequences is the step's peak, so that pass takes the fused path (its outputs are peft's up to
    rounding; below the threshold the two passes may round differently, where nothing is saved). Eval
    mode (generation, evaluation) keeps peft's own forward, and so does sampling in training mode
    (TRL's GRPO generates so): a decode step has a few tokens, no memory to save, and there the
    fused path's extra host work made a 135M model's decode 25% slower (CPU, 2 rows).
    """
    if not layer.training:
        return False
    return torch.is_grad_enabled() or x.numel() // max(x.shape[-1], 1) >= SMALL_NO_GRAD_TOKENS


def adapter_dtype_reason(mods, names) -> str | None:
    """Why linears run as one fused call cannot share one adapter dtype, or ``None``."""
    dtypes = {n: {m.lora_A[a].weight.dtype for a in m.lora_A} | {m.lora_B[a].weight.dtype for a in m.lora_B}
              for n, m in zip(names, mods)}
    if len(set().union(*dtypes.values())) > 1:
        return "adapter dtypes differ: " + ", ".join(f"{n} {sorted(str(d) for d in ds)}" for n, ds in dtypes.items())
    return None


def group_reason(mods, names) -> str | None:
    """Why ``mods`` (peft LoRA linears on one input) cannot run as one fused call, or ``None``."""
    for n, m in zip(names, mods):
        why = lora_fast_path_reason(m, allow_bias=True)
        if why is not None:
            return f"{n}: {why}"
    return adapter_dtype_reason(mods, names)
