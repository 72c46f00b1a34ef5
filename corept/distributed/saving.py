"""Saving a model trained under DDP or FSDP2: gather on every rank, write on rank 0 only.

* DDP: every rank holds the whole model; rank 0 saves with ``corept.save``, the others wait.
* FSDP2: parameters are DTensor shards. LoRA adapters are gathered (every rank takes part in each
  all-gather) and rank 0 writes the adapter folder; a fully fine-tuned model is gathered to rank
  0's CPU (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``: one full copy in host
  RAM there) and written as a plain transformers folder. Merging adapters into a sharded base is
  not done here: save the adapter, then merge on one machine (``corept.save(..., "merged_16bit")``
  after loading base + adapter).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch.nn as nn

from corept.distributed.launcher import barrier, is_main_process
from corept.errors import InvalidOptionsError

logger = logging.getLogger("corept")


def save_sharded(model: nn.Module, tokenizer, path: str | os.PathLike, method: str = "lora") -> Path | None:
    """Save an FSDP2-sharded ``model``; a collective (call it on every rank).

    :param method: ``"lora"`` (adapter, safetensors) or ``"merged_16bit"`` (a fully fine-tuned
        model's weights in their training dtype, plain transformers folder).
    :returns: the folder on rank 0, ``None`` elsewhere.
    """
    from corept.distributed.fsdp import full_tensors
    from corept.saving import compute_dtype, file_set, write_weights

    is_peft = hasattr(model, "peft_config")
    if method == "lora" and not is_peft:
        raise InvalidOptionsError("method='lora' needs a peft model")
    if method not in ("lora", "merged_16bit") or (method == "merged_16bit" and is_peft):
        raise InvalidOptionsError(f"under FSDP corept saves 'lora' adapters or a fully fine-tuned model as "
                                  f"'merged_16bit', not {method!r} of a {'peft' if is_peft else 'full'} model; "
                                  f"merge adapters on one machine afterwards")
    if method == "lora":
        sd = full_tensors(model, trainable_only=True)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = None
    if is_main_process():
        dtype = compute_dtype(model)
        with file_set(path, {"method": method, "dtype": str(dtype), "gathered_from": "fsdp2"}) as tmp:
            if method == "lora":
                model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
            else:
                write_weights(model, sd, tmp, dtype)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        out = Path(path)
        logger.info("corept: saved %s (gathered from FSDP2 shards) to %s", method, path)
    del sd
    barrier()
    return out


def save_replica(model: nn.Module, tokenizer, path: str | os.PathLike, method: str = "lora") -> Path | None:
    """Save a DDP replica: rank 0 calls ``corept.save``; every rank waits for it. Returns the folder on rank 0."""
    from corept.saving import save

    out = save(model, tokenizer, path, method=method) if is_main_process() else None
    barrier()
    return out
