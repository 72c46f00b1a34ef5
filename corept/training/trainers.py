"""Build TRL's ``SFTTrainer``, ``DPOTrainer``, ``KTOTrainer`` or ``GRPOTrainer`` (unmodified) for a corept model.

What corept decides and TRL does not:

* **Precision and device**: ``use_cpu=True`` and no mixed precision on CPU (fp32 there); on GPU
  ``bf16``/``fp16`` follow the dtype ``corept.load`` chose.
* **Checkpointing**: TRL's ``gradient_checkpointing`` is always ``False``; corept's own
  (``corept.get_peft_model(use_gradient_checkpointing=...)`` or :func:`enable_full_checkpointing`)
  is already installed and HF's would replace it.
* **Reference models**: LoRA/QLoRA pass ``ref_model=None``. TRL 1.16 then adds a ``"ref"`` adapter,
  a copy of ``"default"``, and runs the reference through it; for freshly initialized adapters
  (``lora_B`` all zero, what ``corept.get_peft_model`` makes) that copy computes exactly the base
  model, so :func:`use_disabled_adapter_reference` deletes it and TRL falls back to its other
  reference path, the adapter disabled (no adapter copy, no LoRA matmuls in the reference
  forward). A trained adapter keeps TRL's copy. Full fine-tuning DPO/KTO gets an explicit frozen
  copy from :func:`reference_copy` (TRL would otherwise reload ``config._name_or_path``).
* **Memory of DPO/KTO/GRPO log-probs**: TRL's fused LM head (``add_fused_lm_head``) computes per-token
  log-probs of the policy and the reference tile by tile (on CUDA only over the positions with a
  label, elsewhere over all), without full-vocabulary logits for the whole batch.
* **GRPO**: completions are sampled by the patched model's own ``generate()`` (TRL's default path,
  with the KV cache), ``--num-generations`` per prompt, scored by the reward functions of
  :mod:`corept.training.rewards`. The KL term is off (TRL's default ``beta=0``), so no reference
  forward runs; ``--beta`` > 0 turns it on, with the adapter disabled as the reference.
"""
from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
import weakref

import torch
import torch.nn as nn

from corept.training.compat import guard_4bit
from corept.training.options import TrainOptions, beta_of

logger = logging.getLogger("corept")


def on_gpu(model: nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if torch.is_floating_point(p) and p.dtype != torch.uint8:
            return p.dtype
    return torch.float32


def kto_weights(dataset) -> dict:
    """``desirable_weight`` / ``undesirable_weight`` balancing the two labels' total loss (KTO paper,
    TRL's recommended range): the rarer label's weight is the count ratio, the other 1."""
    labels = list(dataset["label"])
    n_good, n_bad = sum(bool(v) for v in labels), sum(not v for v in labels)
    if not n_good or not n_bad or n_good == n_bad:
        return {}
    if n_good > n_bad:
        return {"undesirable_weight": n_good / n_bad}
    return {"desirable_weight": n_bad / n_good}


def trl_config(method: str, opts: TrainOptions, *, output_dir: str, gpu: bool, dtype: torch.dtype,
               extra: dict | None = None):
    """The TRL config (``SFTConfig`` / ``DPOConfig`` / ``KTOConfig``) for ``opts``."""
    from trl import DPOConfig, GRPOConfig, KTOConfig, SFTConfig

    common = dict(
        output_dir=str(output_dir), per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr,
        num_train_epochs=float(opts.epochs or 1.0), max_steps=opts.max_steps or -1, seed=opts.seed,
        data_seed=opts.seed, optim=opts.optim, logging_steps=opts.logging_steps, report_to="none",
        save_strategy="no", gradient_checkpointing=False, use_cpu=not gpu,
        bf16=gpu and dtype == torch.bfloat16, fp16=gpu and dtype == torch.float16,
        max_length=opts.max_seq_length, lr_scheduler_type="linear", disable_tqdm=False,
        dataloader_num_workers=0)
    if opts.warmup_ratio > 0:
        common["warmup_steps"] = float(opts.warmup_ratio)
    common.update(extra or {})
    if method == "sft":
        # packing: TRL's best-fit-decreasing bins of max_length tokens, padding-free (one row, position
        # ids restarting per document, cu_seq_lens for the attention: corept's varlen kernel)
        packing = dict(packing=True, packing_strategy="bfd") if opts.packing else dict(packing=False)
        return SFTConfig(**common, **packing)
    if method == "dpo":
        return DPOConfig(**common, beta=beta_of(opts), precompute_ref_log_probs=False)
    if method == "kto":
        return KTOConfig(**common, beta=beta_of(opts), precompute_ref_log_probs=False)
    if method == "grpo":
        common.pop("max_length")  # prompts are cut by the tokenizer's own limit; completions by max_completion_length
        return GRPOConfig(**common, num_generations=opts.num_generations,
                          max_completion_length=opts.max_completion_length, beta=beta_of(opts),
                          log_completions=False)
    raise ValueError(f"unknown method {method!r}")


def reference_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy of a fully fine-tuned model (corept's patches come along)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def use_disabled_adapter_reference(model: nn.Module) -> bool:
    """Delete TRL's ``"ref"`` adapter copy when ``"default"`` is untrained; True if deleted.

    With no ``"ref"`` adapter, TRL's DPO/KTO compute reference log-probs with the adapter disabled.
    """
    peft_config = getattr(model, "peft_config", {})
    if "ref" not in peft_config or "default" not in peft_config:
        return False
    fresh = all(not p.any() for n, p in model.named_parameters() if ".lora_B.default." in n)
    if not fresh:
        logger.info("corept: the adapter is already trained; TRL's 'ref' adapter copy stays the reference")
        return False
    model.delete_adapter("ref")
    model.set_adapter("default")
    return True


def enable_full_checkpointing(model: nn.Module, mode) -> str:
    """corept's gradient checkpointing on a model trained without adapters (full fine-tuning)."""
    from corept.training.checkpointing import enable_checkpointing

    how = enable_checkpointing(model, mode)
    if mode:
        model.config.use_cache = False
    return how


def build_trainer(method: str, model: nn.Module, tokenizer, train_dataset, opts: TrainOptions, *,
                  ref_model: nn.Module | None = None, output_dir: str | None = None, callbacks=None):
    """A TRL trainer for ``method`` on ``model`` (a corept peft model, or a full-fine-tuning model).

    :param ref_model: DPO/KTO full fine-tuning only (``None`` makes a :func:`reference_copy`);
        must stay ``None`` for peft models (the reference is the adapter disabled).
    :param output_dir: TRL's ``output_dir`` (nothing is written there with the default
        ``save_strategy="no"``); default a temporary folder removed with the trainer.
    """
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer, SFTTrainer

    is_peft = hasattr(model, "peft_config")
    if method in ("dpo", "kto") and not is_peft and ref_model is None:
        ref_model = reference_copy(model)
    if is_peft and ref_model is not None:
        raise ValueError("LoRA/QLoRA models use the adapter-disabled model as reference: pass ref_model=None")
    from corept.training.distributed import trainer_kwargs

    extra = trainer_kwargs(opts, model)  # ddp_find_unused_parameters=False; FSDP2 plugin under --distributed fsdp
    gpu = on_gpu(model) or ("fsdp" in extra and torch.cuda.is_available())  # FSDP loads on CPU, shards onto GPUs
    temporary = None if output_dir else tempfile.mkdtemp(prefix="corept-trl-")
    if method == "kto":
        extra.update(kto_weights(train_dataset))
    args = trl_config(method, opts, output_dir=output_dir or temporary, gpu=gpu, dtype=model_dtype(model),
                      extra=extra)
    kwargs = dict(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                  callbacks=callbacks)
    if method == "sft":
        trainer = SFTTrainer(**kwargs)
    elif method == "dpo":
        trainer = DPOTrainer(ref_model=ref_model, **kwargs)
    elif method == "kto":
        trainer = KTOTrainer(ref_model=ref_model, **kwargs)
    elif method == "grpo":
        from corept.training.rewards import resolve

        trainer = GRPOTrainer(reward_funcs=resolve(opts.rewards, train_dataset, str(opts.data or "data")), **kwargs)
    else:
        raise ValueError(f"unknown method {method!r}")
    if temporary is not None:
        weakref.finalize(trainer, shutil.rmtree, temporary, True)
    if is_peft and method in ("dpo", "kto", "grpo"):
        use_disabled_adapter_reference(trainer.model)
    guard_4bit(trainer.model)
    return trainer


def planned_steps(trainer) -> int:
    """Optimizer steps the trainer will run (``max_steps``, else epochs over the data)."""
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    return max(1, math.ceil(len(trainer.train_dataset) / per_step) * math.ceil(args.num_train_epochs))
