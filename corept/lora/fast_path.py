"""When a peft LoRA linear, or a group of them, can run on corept's fused LoRA kernels."""
from __future__ import annotations

from corept_kernels.lora import lora_fast_path_reason


def is_training_call(layer) -> bool:
    """Training mode, with or without gradients.

    Checkpointing's first pass runs the layers under ``no_grad``: on peft's path it would hold
    fp32 ``[N, out]`` adapter products (``N`` tokens; 56 KiB per token for an 8B MLP), which at long
    sequences is the step's peak. The fused path's outputs are peft's, so both passes take it; only
    eval mode (generation, evaluation) keeps peft's own forward.
    """
    return layer.training


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
        why = lora_fast_path_reason(m)
        if why is not None:
            return f"{n}: {why}"
    return adapter_dtype_reason(mods, names)
