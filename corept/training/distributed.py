"""``corept train --distributed ddp|fsdp``: what a run changes when a launcher starts N processes.

``torchrun --nproc-per-node N -m corept train ...`` or ``accelerate launch -m corept train ...``
start one process per GPU; the HF Trainer (under TRL) sees the launcher's environment, builds its
``Accelerator`` and splits every batch of data across the ranks. corept only has to:

* load each rank's replica on its own GPU (``corept.load`` reads ``LOCAL_RANK``);
* give the Trainer ``ddp_find_unused_parameters=False`` (its default for a peft model is ``True``,
  which breaks corept's checkpointing, see ``corept.checkpointing``);
* for ``fsdp``, ask the Trainer for accelerate's FSDP2 plugin (one unit per decoder layer, the
  final norm and ``lm_head`` in one unit, as accelerate lays them out), load the weights on CPU
  (each rank's GPU only ever holds its shards plus one gathered unit) and store 4-bit weights in
  the compute dtype so they shard like the others;
* after training, save from rank 0 (DDP: the replica; FSDP: gathered adapters or weights,
  :mod:`corept.distributed.saving`) and run the patched-vs-unpatched greedy check on rank 0 (DDP
  only: a sharded model can only generate with every rank taking part).

FSDP through accelerate needs CUDA GPUs (accelerate does not shard on CPU; ``corept.distributed
.fsdp.shard`` does, with gloo). docs/distributed.md has the commands.
"""
from __future__ import annotations

import torch

from corept.errors import InvalidOptionsError

MODES = ("ddp", "fsdp")
LAUNCH_HELP = ("start it with a launcher: torchrun --nproc-per-node N -m corept train ... "
               "or accelerate launch --num-processes N -m corept train ... (docs/distributed.md)")


def mode_of(opts) -> str | None:
    """``"ddp"``, ``"fsdp"`` or ``None``: the flag, else ``"ddp"`` when launched with more than one process."""
    from corept.distributed.launcher import launch

    if getattr(opts, "distributed", None) is not None:
        return opts.distributed
    here = launch()
    return "ddp" if here is not None and here.world_size > 1 else None


def validate(opts, *, cuda: bool | None = None) -> None:
    """Reject ``--distributed`` combinations that cannot work, before anything is loaded."""
    from corept.distributed.launcher import launch

    if opts.distributed is None:
        return
    if opts.distributed not in MODES:
        raise InvalidOptionsError(f"--distributed must be one of {MODES}, got {opts.distributed!r}")
    if launch() is None:
        raise InvalidOptionsError(f"--distributed {opts.distributed} runs one process per GPU: {LAUNCH_HELP}")
    if opts.distributed != "fsdp":
        return
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        raise InvalidOptionsError("--distributed fsdp shards through accelerate's FSDP2 plugin, which needs CUDA "
                                  "GPUs; on CPU use --distributed ddp (gloo)")
    if opts.load_in_8bit:
        raise InvalidOptionsError("--distributed fsdp cannot shard LLM.int8 weights; use --load-in-4bit (QLoRA) "
                                  "or a 16-bit base")
    if opts.full_finetuning and opts.method in ("dpo", "kto"):
        raise InvalidOptionsError("--distributed fsdp with --full-finetuning supports --method sft only (DPO/KTO "
                                  "would need a second, sharded reference model); use LoRA for dpo/kto")
    if not opts.full_finetuning and opts.save_method != "lora":
        raise InvalidOptionsError(f"--distributed fsdp saves the LoRA adapter only (--save-method lora, got "
                                  f"{opts.save_method}): merging needs the whole base on one device; merge "
                                  f"afterwards with corept.save(..., method='merged_16bit')")
    if opts.full_finetuning and opts.save_method != "merged_16bit":
        raise InvalidOptionsError("--distributed fsdp --full-finetuning saves the weights as merged_16bit")


def load_kwargs(opts) -> dict:
    """Extra ``corept.load`` arguments: FSDP loads on CPU (4-bit: on this rank's GPU, float storage)."""
    if mode_of(opts) != "fsdp":
        return {}
    # FSDP2 swaps each layer's class and hooks its calls: compiled layers under it are not proven
    off = {"compile": False}
    if opts.load_in_4bit:  # bitsandbytes quantizes on the GPU; 4-bit weights fit one GPU before sharding
        return {"bnb_4bit_quant_storage": "auto", **off}
    return {"device_map": {"": "cpu"}, **off}


def trainer_kwargs(opts, model) -> dict:
    """TRL/HF ``TrainingArguments`` fields for the run's distributed mode."""
    from corept.distributed.fsdp import layer_class_names

    out = {"ddp_find_unused_parameters": False}
    if mode_of(opts) == "fsdp":
        out["fsdp"] = fsdp_flag()
        out["fsdp_config"] = {"version": 2, "reshard_after_forward": True, "activation_checkpointing": False,
                              "cpu_ram_efficient_loading": False,
                              "transformer_layer_cls_to_wrap": sorted(layer_class_names(model))}
    return out


def fsdp_flag():
    """``TrainingArguments.fsdp``: ``"full_shard"`` (transformers < 5.20 needs the string), ``True`` from 5.20
    (the string form is removed there; the sharding strategy lives in ``fsdp_config``)."""
    import transformers
    from packaging.version import Version

    return True if Version(transformers.__version__).release >= (5, 20) else "full_shard"


def save(model, tokenizer, opts, out) -> tuple:
    """``(adapter folder, merged folder)`` written by rank 0 (``None`` on other ranks); a collective."""
    from corept.distributed.saving import save_replica, save_sharded

    adapter = merged = None
    if mode_of(opts) == "fsdp":
        if hasattr(model, "peft_config"):
            adapter = save_sharded(model, tokenizer, out / "adapter", method="lora")
        else:
            merged = save_sharded(model, tokenizer, out / "merged", method="merged_16bit")
        return adapter, merged
    if hasattr(model, "peft_config"):
        adapter = save_replica(model, tokenizer, out / "adapter", method="lora")
    if opts.save_method != "lora":
        merged = save_replica(model, tokenizer, out / "merged", method=opts.save_method)
    return adapter, merged
