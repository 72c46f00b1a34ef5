"""One training run end to end: validate, load, (answer before), train with TRL, check, save, summarize.

Order matters for the promises ``corept train`` makes:

1. :func:`prepare` finalizes and validates the options, resolves the model name and reads and
   checks the data (conversations need a chat template: the tokenizer's or ``--template``).
   Nothing is written to ``--output`` before it returns.
2. The model loads through ``corept.load`` (patched); LoRA/QLoRA adapters come from
   ``corept.get_peft_model`` (fused LoRA kernels); full fine-tuning gets corept checkpointing.
3. TRL trains (:mod:`corept.training.trainers`) inside :func:`~corept.training.compat.trl_head_scope`,
   so TRL's fused LM head is removed again afterwards.
4. The answer after training is generated patched, then ``corept.unpatch`` and again: the greedy
   tokens must be identical.
5. ``corept.save`` writes ``OUTPUT/adapter`` (LoRA) and ``OUTPUT/merged`` (merged_16bit /
   merged_4bit) atomically, then ``OUTPUT/run.json`` (options, losses, answers, timings).

Guards (:mod:`corept.training.safety`): ``--output`` is checked writable before the model loads;
third-party telemetry is off for the run; a Ctrl-C during training stops it cleanly and saves the
adapters trained so far to ``OUTPUT/adapter`` (the run record says at which step).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from corept.errors import InvalidOptionsError
from corept.training.chat_templates import check_chat_template, is_conversational, use_chat_template
from corept.training.data import load_training_data
from corept.training import distributed
from corept.training.cpu import initial_threads
from corept.training.generation import GreedyCheck, answer_shown, patched_unpatched_check
from corept.training.options import TrainOptions, checkpointing_mode, finalize, validate
from corept.training.responses_only import resolve_train_on, sft_training_data
from corept.training.safety import check_writable, epochs_warning, no_telemetry, remove_stale
from corept.training.summary import data_record, format_loss_summary, loss_summary

logger = logging.getLogger("corept")


@dataclass
class RunResult:
    """What a run produced (paths are ``None`` when not written)."""

    options: TrainOptions
    output: Path
    adapter: Path | None = None
    merged: Path | None = None
    gguf: Path | None = None
    log_history: list = field(default_factory=list)
    question: str | list | None = None
    before: str | None = None
    after: str | None = None
    greedy: GreedyCheck | None = None
    applied: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    thread_changes: list = field(default_factory=list)  # (step, torch threads) set on a busy CPU
    interrupted_at: int | None = None  # the optimizer step a Ctrl-C stopped training at


def prepare(opts: TrainOptions):
    """Finalize + validate options, resolve the model, read + check the data. Writes nothing.

    :returns: ``(options, dataset, data format, model folder)``.
    """
    import torch

    from corept.loading.names import resolve_model_path

    opts = finalize(opts, on_gpu=torch.cuda.is_available())
    validate(opts)
    if opts.data is None or opts.model is None:
        raise InvalidOptionsError("--model and --data go together (give both, or neither for the embedded default)")
    folder, _ = resolve_model_path(opts.model)
    dataset, fmt = load_training_data(opts.data, opts.method)
    if opts.method == "sft":
        opts.train_on = resolve_train_on(opts.train_on, fmt)
    if opts.method == "grpo":  # the rewards' own columns (exact_match: every row's answer), before the model loads
        from corept.training.rewards import resolve

        resolve(opts.rewards, dataset, str(opts.data))
    check_chat_template(str(folder), opts.template, dataset, who=opts.model)
    check_writable(Path(opts.output).expanduser())
    return opts, dataset, fmt, str(folder)


def sample_question(dataset, fmt: str):
    """A prompt for the closing sample generation: row 0's prompt (or first user turn, or text start)."""
    row = dataset[0]
    if "prompt" in row:
        return row["prompt"]
    if "messages" in row:
        users = [m for m in row["messages"] if m["role"] != "assistant"]
        return users[: max(1, len(users))] if users else row["messages"][:1]
    words = str(row.get("text", "")).split()
    return " ".join(words[: max(1, min(12, len(words) // 2))])


def _load_model(opts: TrainOptions, folder: str):
    import corept
    from corept.training.distributed import load_kwargs

    model, tokenizer = corept.load(folder, max_seq_length=opts.max_seq_length, load_in_4bit=opts.load_in_4bit,
                                   load_in_8bit=opts.load_in_8bit, full_finetuning=opts.full_finetuning,
                                   **load_kwargs(opts))
    if tokenizer is None:
        raise InvalidOptionsError(f"{opts.model} has no tokenizer; training needs one in the model folder")
    return model, tokenizer


def _add_trainable(model, opts: TrainOptions):
    import corept
    from corept.training.trainers import enable_full_checkpointing

    mode = checkpointing_mode(opts)
    if opts.full_finetuning:
        enable_full_checkpointing(model, mode)  # the report reads it from the layers (settings["checkpointing"])
        return model
    return corept.get_peft_model(model, r=opts.r, lora_alpha=opts.lora_alpha, target_modules=opts.targets,
                                 use_gradient_checkpointing=mode, random_state=opts.seed)


def _train(model, tokenizer, dataset, opts: TrainOptions, max_threads: int):
    from corept.training.compat import trl_head_scope
    from corept.training.cpu import ThreadGovernor, managed
    from corept.training.progress import CompactProgress, use_progress
    from corept.training.trainers import build_trainer

    with trl_head_scope(model):
        trainer = build_trainer(opts.method, model, tokenizer, dataset, opts)
        use_progress(trainer, CompactProgress())
        governor = ThreadGovernor(ceiling=max_threads) if managed() else None
        if governor is not None:
            trainer.add_callback(governor)
        interrupted = None
        try:
            trainer.train()
        except KeyboardInterrupt:
            interrupted = trainer.state.global_step
    return trainer.state.log_history, (governor.changes if governor else []), interrupted


def _save(model, tokenizer, opts: TrainOptions, result: RunResult) -> None:
    import corept

    out = Path(opts.output).expanduser()
    if hasattr(model, "peft_config"):
        result.adapter = corept.save(model, tokenizer, out / "adapter", method="lora")
    if opts.save_method != "lora" and result.interrupted_at is None:
        result.merged = corept.save(model, tokenizer, out / "merged", method=opts.save_method)
    if opts.save_gguf and result.interrupted_at is None:
        result.gguf = corept.save(model, tokenizer, out / "gguf", method="gguf", quantization=opts.save_gguf)
    remove_stale(out, {name for name, path in (("adapter", result.adapter), ("merged", result.merged),
                                               ("gguf", result.gguf)) if path})


def _write_record(result: RunResult) -> None:
    record = {"options": asdict(result.options), "data": data_record(result.options.data),
              "loss": loss_summary(result.log_history),
              "reward": loss_summary(result.log_history, "reward") if result.options.method == "grpo" else None,
              "question": result.question, "before": result.before, "after": result.after,
              "greedy_patched_equals_unpatched": None if result.greedy is None else result.greedy.equal,
              "after_stopped": None if result.greedy is None else result.greedy.stopped,
              "applied": result.applied, "seconds": result.seconds, "thread_changes": result.thread_changes,
              "adapter": str(result.adapter) if result.adapter else None,
              "merged": str(result.merged) if result.merged else None,
              "gguf": str(result.gguf) if result.gguf else None,
              "interrupted_at_step": result.interrupted_at}
    (result.output / "run.json").write_text(json.dumps(record, indent=2, default=str))


def _show(q) -> str:
    return q if isinstance(q, str) else " / ".join(m["content"] for m in q)


def run_training(opts: TrainOptions, echo: Callable[[str], None] = print) -> RunResult:
    """Run ``opts`` end to end (see the module docstring); ``echo`` receives every printed line."""
    with no_telemetry():
        return _run(opts, echo)


def _run(opts: TrainOptions, echo: Callable[[str], None]) -> RunResult:
    import corept

    import torch

    from corept.distributed.launcher import is_main_process

    t0 = time.perf_counter()
    opts, dataset, fmt, folder = prepare(opts)
    mode, main = distributed.mode_of(opts), is_main_process()
    if not main:
        echo = _quiet  # one rank speaks for the group
    result = RunResult(options=opts, output=Path(opts.output).expanduser())
    max_threads = torch.get_num_threads()
    for note in opts.notes + [initial_threads()]:
        if note:
            echo(note)
    echo(f"data: {opts.data} ({len(dataset)} rows, {fmt} format) -> method {opts.method}, "
         f"{opts.adapter_kind}" + ("" if opts.full_finetuning else f" r {opts.r} alpha {opts.lora_alpha}"))
    echo(f"sizes: seq {opts.max_seq_length}, batch {opts.batch_size} x accum {opts.grad_accum}, lr {opts.lr:g}, "
         + (f"{opts.max_steps} steps" if opts.max_steps else f"{opts.epochs:g} epoch(s)") + f", optim {opts.optim}")
    from corept.distributed.launcher import launch

    world = launch().world_size if mode is not None else 1
    too_many = epochs_warning(opts.max_steps, len(dataset), opts.batch_size * opts.grad_accum * world)
    if too_many:
        logger.warning("corept: %s", too_many)
        echo(f"warning: {too_many}")
    model, tokenizer = _load_model(opts, folder)
    use_chat_template(tokenizer, opts.template, required=is_conversational(dataset), who=opts.model)
    result.seconds["load"] = round(time.perf_counter() - t0, 1)
    result.question = opts.held_out_question or opts.sample_prompt or sample_question(dataset, fmt)
    label = "held-out question" if opts.held_out_question else "sample prompt"
    if mode is not None:
        echo(f"distributed: {mode}, {launch().world_size} processes; each trains on its own share of every "
             f"batch (--batch-size is per process)")
    if opts.held_out_question and main and mode != "fsdp":
        result.before = answer_shown(model, tokenizer, result.question, opts.max_new_tokens)
        echo(f"{label}: {_show(result.question)}\n  before training: {result.before}")
    model = _add_trainable(model, opts)
    rep = corept.report(model)
    result.applied = dict(rep.applied)
    echo("corept kernels: " + ", ".join(f"{k}={v}" for k, v in result.applied.items())
         + f"; checkpointing: {rep.settings.get('checkpointing')}")
    if opts.method == "sft" and opts.packing and mode != "fsdp":
        from corept.training.packing_check import crosses_documents

        if crosses_documents(model):
            opts.packing = False
            note = (f"packing: off. This {model.config.model_type} model's attention lets one packed document see "
                    f"another (a two-document probe), so batches are padded instead; --no-packing skips the probe")
            logger.warning("corept: %s", note)
            echo(note)
    if mode == "fsdp" and not any(p.is_cuda for p in model.parameters()):
        echo("  (loaded on CPU for sharding: each kernel call picks Triton once its shards are on the GPU)")
    t1 = time.perf_counter()
    if opts.method == "sft":  # conversations tokenized here, the loss mask per --train-on (responses_only.py)
        dataset = sft_training_data(dataset, fmt, tokenizer, opts.train_on)
    result.log_history, result.thread_changes, result.interrupted_at = _train(model, tokenizer, dataset, opts,
                                                                              max_threads)
    result.seconds["train"] = round(time.perf_counter() - t1, 1)
    if result.interrupted_at is not None:
        return _interrupted(model, tokenizer, opts, result, echo, t0)
    if main and mode != "fsdp":  # a sharded model generates only with every rank taking part: skipped
        result.greedy = patched_unpatched_check(model, tokenizer, result.question, opts.max_new_tokens)
        result.after = result.greedy.text
    t2 = time.perf_counter()
    if mode is None:
        _save(model, tokenizer, opts, result)
    else:
        result.adapter, result.merged = distributed.save(model, tokenizer, opts, result.output)
    result.seconds["save"] = round(time.perf_counter() - t2, 1)
    result.seconds["total"] = round(time.perf_counter() - t0, 1)
    if main:
        _write_record(result)
    _print_summary(result, label, echo)
    if mode is not None:
        from corept.distributed.launcher import leave_group

        leave_group()
    return result


def _interrupted(model, tokenizer, opts: TrainOptions, result: RunResult, echo, t0: float) -> RunResult:
    """Ctrl-C during training: save the adapters trained so far (LoRA), write the record, say where."""
    echo(f"\ninterrupted at step {result.interrupted_at}: "
         + ("saving the adapters trained so far" if hasattr(model, "peft_config") else
            "full fine-tuning saves nothing (the weights are the whole model; --max-steps stops at a step of your "
            "choice)"))
    if distributed.mode_of(opts) is None:
        _save(model, tokenizer, opts, result)
    result.seconds["total"] = round(time.perf_counter() - t0, 1)
    _write_record(result)
    if result.adapter:
        echo(f"adapter (LoRA, safetensors, step {result.interrupted_at}): {result.adapter}")
    echo(f"run record: {result.output / 'run.json'}")
    return result


def _quiet(*_args) -> None:
    return None


def _print_summary(result: RunResult, label: str, echo) -> None:
    echo("")
    echo(format_loss_summary(result.log_history))
    if result.options.method == "grpo":
        echo(format_loss_summary(result.log_history, key="reward"))
    if result.adapter:
        echo(f"adapter (LoRA, safetensors): {result.adapter}")
    if result.merged:
        needs = "transformers + bitsandbytes" if result.options.save_method == "merged_4bit" else "plain transformers"
        echo(f"merged model ({result.options.save_method}, loads in {needs}): {result.merged}")
    if result.gguf:
        echo(f"GGUF ({result.options.save_gguf}, for llama.cpp / Ollama): {result.gguf}")
    elif result.merged:
        echo(f"GGUF for llama.cpp / Ollama: corept export {result.merged} --quantization q4_k_m "
             f"--output {result.output / 'gguf'}")
    if result.adapter or result.merged:
        echo(f"run record (options, losses, answers, timings): {result.output / 'run.json'}")
    echo(f"{label}: {_show(result.question)}")
    if result.before is not None:
        echo(f"  before training: {result.before}")
    if result.greedy is not None:
        echo(f"  after training:  {result.greedy.shown()}")
        echo(result.greedy.line())
    else:
        echo("  after training:  (not generated: the model is sharded across ranks; load the saved folder to try it)")
    if result.thread_changes:
        echo("cpu threads (other processes came and went): "
             + ", ".join(f"{n} from step {step}" for step, n in result.thread_changes))
    s = result.seconds
    echo(f"time: load {s.get('load')} s, train {s.get('train')} s, save {s.get('save')} s, total {s.get('total')} s")
