"""The options of one training run: defaults, profile merging and validation (before anything is written).

:class:`TrainOptions` holds what ``corept train`` was asked; fields left ``None`` are filled by
:func:`finalize` from, in order: the explicit value, the ``--profile``, then :data:`DEFAULTS`
(learning rates per method and per LoRA/full). :func:`validate` rejects contradictions with a
message that names the flag, and refuses a non-empty ``--output`` unless ``overwrite`` is set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from corept.errors import InvalidOptionsError
from corept.training.data import METHODS
from corept.training.profiles import default_optim, resolve_profile

SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")
CHECKPOINTING = {"auto": "auto", "corept": "corept", "true": True, "standard": True, "false": False, "off": False}

#: Values used when neither a flag nor the profile gives one.
DEFAULTS = dict(max_seq_length=1024, batch_size=2, grad_accum=1, r=16, lora_alpha=None, epochs=1.0)
#: Learning rates: (LoRA, full fine-tuning) per method.
DEFAULT_LR = {"sft": (2e-4, 2e-5), "dpo": (5e-5, 1e-6), "kto": (5e-5, 1e-6), "grpo": (5e-5, 1e-6)}
#: GRPO: completions sampled per prompt, and their length in tokens, when not given.
GRPO_DEFAULTS = dict(num_generations=4, max_completion_length=128)


@dataclass
class TrainOptions:
    """Everything one ``corept train`` run needs. ``None`` means "not given": see :func:`finalize`."""

    model: str | None = None
    data: str | None = None
    method: str = "sft"
    output: str | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    full_finetuning: bool = False
    r: int | None = None
    lora_alpha: float | None = None
    targets: str | list[str] = "all-linear"
    max_seq_length: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    lr: float | None = None
    epochs: float | None = None
    max_steps: int | None = None
    save_method: str = "merged_16bit"
    save_gguf: str | None = None  # a GGUF mix (q4_k_m, q8_0, ...): also write OUTPUT/gguf/<name>-<MIX>.gguf
    seed: int = 3407
    profile: str | None = None
    optim: str | None = None
    gradient_checkpointing: str = "corept"
    beta: float | None = None  # DPO/KTO beta (default 0.1); GRPO's KL coefficient (default 0: no reference pass)
    overwrite: bool = False
    sample_prompt: str | None = None
    held_out_question: str | None = None
    max_new_tokens: int = 48
    warmup_ratio: float = 0.0
    logging_steps: int = 1
    distributed: str | None = None  # "ddp" / "fsdp" under torchrun or accelerate launch (training/distributed.py)
    template: str | None = None  # --template: a shipped chat template's name or a .jinja path (chat_templates.py)
    train_on: str | None = None  # --train-on responses / all (sft); None: by the data format (responses_only.py)
    packing: bool | None = None  # sft: padding-free packing (TRL's bfd bins of max_seq_length); None: on for sft
    rewards: list | None = None  # grpo: --reward specs (rewards.py); None: exact_match with an answer column, else format
    num_generations: int | None = None  # grpo: completions per prompt (the group)
    max_completion_length: int | None = None  # grpo: tokens generated per completion
    embedded: bool = False  # the no-argument run (shipped data; answer a held-out question)
    notes: list = field(default_factory=list)

    @property
    def adapter_kind(self) -> str:
        """``"full"``, ``"qlora"`` (4-bit base) or ``"lora"`` (what the planner and the report call it)."""
        return "full" if self.full_finetuning else "qlora" if self.load_in_4bit else "lora"


def beta_of(opts: TrainOptions) -> float:
    """``--beta`` as given, else the method's default: 0.1 (DPO/KTO), 0.0 (GRPO: no KL term)."""
    if opts.beta is not None:
        return opts.beta
    return 0.0 if opts.method == "grpo" else 0.1


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidOptionsError(f"{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidOptionsError(f"{name} must be a positive number, got {value!r}")


def parse_targets(targets) -> str | list[str]:
    """``"all-linear"`` or a list of module names from ``"q_proj,v_proj"`` / a list."""
    if targets in (None, "", "all-linear", "all"):
        return "all-linear"
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    items = [t.strip() for t in items if t and t.strip()]
    if not items:
        raise InvalidOptionsError(f"--targets must be 'all-linear' or comma-separated module names, got {targets!r}")
    return items


def finalize(opts: TrainOptions, *, on_gpu: bool) -> TrainOptions:
    """A copy of ``opts`` with every ``None`` size filled (explicit > profile > defaults)."""
    explicit = {f.name: getattr(opts, f.name) for f in fields(opts) if getattr(opts, f.name) is not None}
    prof = resolve_profile(opts.profile, model=opts.model or "", method=opts.adapter_kind, pinned=explicit,
                           on_gpu=on_gpu)
    if opts.r is not None:
        prof.pop("lora_alpha", None)  # the profile's alpha goes with the profile's rank
    values = {}
    for name in ("max_seq_length", "batch_size", "grad_accum", "r", "lora_alpha", "epochs", "optim"):
        if getattr(opts, name) is None:
            values[name] = prof.get(name, DEFAULTS.get(name))
    out = replace(opts, **values)
    if out.lora_alpha is None:
        out.lora_alpha = out.r
    if out.optim is None:  # FSDP: torch's AdamW (bitsandbytes' 8-bit states are not DTensor-aware)
        out.optim = "adamw_torch" if out.distributed == "fsdp" else default_optim(on_gpu)
    if out.lr is None:
        lora_lr, full_lr = DEFAULT_LR.get(out.method, DEFAULT_LR["sft"])
        out.lr = full_lr if out.full_finetuning else lora_lr
    out.targets = parse_targets(out.targets)
    if out.packing is None:
        out.packing = out.method == "sft"
    out.beta = beta_of(out)
    if out.method == "grpo":
        for name, value in GRPO_DEFAULTS.items():
            if getattr(out, name) is None:
                setattr(out, name, value)
        if opts.batch_size is None:  # one group of completions a step (a profile's batch counts rows, not groups)
            out.batch_size = out.num_generations
    return out


def validate(opts: TrainOptions) -> None:
    """Reject bad or contradictory options; nothing has been read, loaded or written yet.

    :raises InvalidOptionsError: naming the flag at fault.
    """
    from corept.loading import validate_options

    if opts.method not in METHODS:
        raise InvalidOptionsError(f"--method must be one of {METHODS}, got {opts.method!r}")
    validate_options(max_seq_length=opts.max_seq_length, dtype=None, load_in_4bit=opts.load_in_4bit,
                     load_in_8bit=opts.load_in_8bit, full_finetuning=opts.full_finetuning)
    for name in ("max_seq_length", "batch_size", "grad_accum", "r", "logging_steps", "max_new_tokens"):
        _positive_int(f"--{name.replace('_', '-')}", getattr(opts, name))
    if opts.max_steps is not None:
        _positive_int("--max-steps", opts.max_steps)
    else:
        _positive_float("--epochs", opts.epochs)
    _positive_float("--lr", opts.lr)
    _positive_float("--alpha", opts.lora_alpha)
    if opts.method == "grpo":
        if isinstance(opts.beta, bool) or not isinstance(opts.beta, (int, float)) or not 0 <= opts.beta < math.inf:
            raise InvalidOptionsError(f"--beta (GRPO's KL coefficient) must be >= 0, got {opts.beta!r}")
    else:
        _positive_float("--beta", opts.beta)
    if not 0.0 <= opts.warmup_ratio < 1.0:
        raise InvalidOptionsError(f"--warmup-ratio must be in [0, 1), got {opts.warmup_ratio!r}")
    if opts.save_method not in SAVE_METHODS:
        raise InvalidOptionsError(f"--save-method must be one of {SAVE_METHODS}, got {opts.save_method!r}")
    if opts.save_gguf is not None:
        from corept.export.gguf.writer import normalize_mix

        opts.save_gguf = normalize_mix(opts.save_gguf)
        if opts.distributed:
            raise InvalidOptionsError("--save-gguf is not written by distributed runs (the model is split across "
                                      "ranks); export afterwards on one machine: corept export OUTPUT/adapter "
                                      f"--quantization {opts.save_gguf} --output OUTPUT/gguf")
    if opts.full_finetuning and opts.save_method == "lora":
        raise InvalidOptionsError("--save-method lora saves adapters, but --full-finetuning trains no adapters: "
                                  "use --save-method merged_16bit (or merged_4bit).")
    if opts.save_method == "merged_4bit" or opts.load_in_4bit or opts.load_in_8bit or opts.optim.endswith("8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            raise InvalidOptionsError(f"this run needs bitsandbytes (4/8-bit loading, merged_4bit or "
                                      f"{opts.optim}), which failed to import: {exc}") from exc
    if opts.method == "kto" and opts.batch_size < 2:
        raise InvalidOptionsError("--method kto needs --batch-size >= 2: TRL's KTOTrainer estimates its KL term "
                                  "from mismatched pairs within a batch.")
    _check_optim(opts.optim)
    _check_chat_options(opts)
    _check_grpo_options(opts)
    if opts.packing and opts.method != "sft":
        raise InvalidOptionsError(f"--packing applies to sft; --method {opts.method} compares whole sequences "
                                  f"(drop --packing)")
    if str(opts.gradient_checkpointing).lower() not in CHECKPOINTING:
        raise InvalidOptionsError(f"--gradient-checkpointing must be one of {sorted(CHECKPOINTING)}, "
                                  f"got {opts.gradient_checkpointing!r}")
    from corept.training.distributed import validate as validate_distributed

    validate_distributed(opts)
    if opts.output is None:
        raise InvalidOptionsError("--output DIR is required when --model or --data is given")
    out = Path(opts.output).expanduser()
    if out.exists() and not out.is_dir():
        raise InvalidOptionsError(f"--output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not opts.overwrite:
        raise InvalidOptionsError(f"--output {out} exists and is not empty; choose a new folder or pass "
                                  f"--overwrite (its adapter/ and merged/ subfolders are then replaced)")


def _check_optim(optim: str) -> None:
    """``--optim`` must be an optimizer the HF Trainer knows (checked before the model loads)."""
    from transformers.training_args import OptimizerNames

    known = sorted(o.value for o in OptimizerNames)
    if optim not in known:
        close = [k for k in known if optim.replace("-", "_") in k or k in optim][:5]
        raise InvalidOptionsError(f"--optim {optim!r} is not an optimizer the HF Trainer knows"
                                  + (f" (did you mean {', '.join(close)}?)" if close else "")
                                  + f"; e.g. adamw_torch, adamw_8bit, paged_adamw_8bit, sgd")


def _check_chat_options(opts: TrainOptions) -> None:
    """``--template`` names a shipped template or a readable file; ``--train-on`` is a known value, for sft."""
    from corept.training.chat_templates import read_template
    from corept.training.responses_only import TRAIN_ON

    if opts.template is not None:
        read_template(opts.template)
    if opts.train_on is not None:
        if opts.train_on not in TRAIN_ON:
            raise InvalidOptionsError(f"--train-on must be one of {TRAIN_ON}, got {opts.train_on!r}")
        if opts.method != "sft":
            raise InvalidOptionsError(f"--train-on applies to sft; --method {opts.method} scores whole completions")


def _check_grpo_options(opts: TrainOptions) -> None:
    """GRPO's own flags only with ``--method grpo``; a group of at least 2 that divides the batch."""
    flags = {"rewards": "--reward", "num_generations": "--num-generations",
             "max_completion_length": "--max-completion-length"}
    given = [flag for field_name, flag in flags.items() if getattr(opts, field_name) is not None]
    if opts.method != "grpo":
        if given:
            raise InvalidOptionsError(f"{', '.join(given)} applies to --method grpo")
        return
    from corept.training.rewards import parse_reward

    for spec in opts.rewards or []:
        parse_reward(spec)
    _positive_int("--max-completion-length", opts.max_completion_length)
    if not isinstance(opts.num_generations, int) or opts.num_generations < 2:
        raise InvalidOptionsError(f"--num-generations must be at least 2 (GRPO compares completions of one prompt "
                                  f"with each other), got {opts.num_generations!r}")
    per_step = opts.batch_size * opts.grad_accum
    if per_step % opts.num_generations:
        raise InvalidOptionsError(f"--batch-size x --grad-accum ({opts.batch_size} x {opts.grad_accum} = {per_step}) "
                                  f"must be a multiple of --num-generations ({opts.num_generations}): each step "
                                  f"trains on whole groups of completions")


def checkpointing_mode(opts: TrainOptions):
    """The ``use_gradient_checkpointing`` value for corept: ``"auto"``, ``"corept"``, ``True`` or ``False``."""
    return CHECKPOINTING[str(opts.gradient_checkpointing).lower()]
