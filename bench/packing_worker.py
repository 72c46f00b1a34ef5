"""Runs of the packing benchmark, in their own process (started by bench/packing.py, never imported).

Usage: ``python -P bench/packing_worker.py SPEC.json``. The spec names the model folder, the
length mix, the budget and its ``runs``: one per variant, each with its stack (``stack_variant``:
an e2e variant such as ``corept_qlora``, bench/e2e_variants.py), its batching (``packed``,
``padded`` or ``unsloth_default``) and batch settings. On a GPU the driver starts one process per
run; the CPU smoke gives a stack's runs to one process (they share its imports). Order of work:

1. import the stack (Unsloth before transformers; TRL's ``SFTConfig`` / ``SFTTrainer`` after it:
   the patched ones under Unsloth), load the checkpoint's tokenizer and build the pre-tokenized
   dataset (bench/packing_data.py), once per process;
2. load the model and add LoRA the stack's public way (``e2e_variants.setup``: ``corept.load`` +
   ``corept.get_peft_model``; ``from_pretrained`` + peft + HF checkpointing; ``FastLanguageModel``),
   ``model.config.use_cache = False``;
3. build ``SFTTrainer`` with the batching's ``SFTConfig`` and train one epoch; a callback times
   every optimizer step between two synchronizations, and a wrapper around the trainer's
   ``training_step`` counts the tokens of every micro-batch it receives (see :func:`count_tokens`).

Records (a JSON list, one per run) are rewritten after every step, so a run that is killed still
leaves what it measured. Memory on CUDA is ``torch.cuda`` allocated bytes; on CPU (smoke) RSS.
"""
from __future__ import annotations

import datetime
import gc
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"corept_bench_{name}", os.path.join(_HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


W, V, D = _sibling("e2e_worker"), _sibling("e2e_variants"), _sibling("packing_data")


def sft_config(spec: dict, run: dict, out_dir: str, gpu: bool):
    """The same ``SFTConfig`` for every stack; only packing differs.

    ``packed``: ``packing=True, packing_strategy="bfd"`` (TRL turns padding-free on). ``padded`` and
    ``unsloth_default``: ``packing=False`` and ``padding_free`` left unset: TRL pads each batch to
    its longest row; Unsloth resolves an unset ``padding_free`` itself (bench/packing.py).
    Gradient checkpointing stays off here because every stack installed its own when the adapters
    were added (TRL's would replace corept's), as ``corept.training.trainers`` does.
    """
    from trl import SFTConfig

    kw = dict(output_dir=out_dir, per_device_train_batch_size=run["batch"],
              gradient_accumulation_steps=run["grad_accum"], max_length=spec["max_length"], num_train_epochs=1,
              max_steps=-1, learning_rate=spec["lr"], warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
              seed=spec["seed"], data_seed=spec["seed"], logging_steps=1, save_strategy="no", report_to="none",
              disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=False, use_cpu=not gpu,
              bf16=gpu and spec["dtype"] == "bf16", fp16=False)
    if run["batching"] == "packed":
        kw.update(packing=True, packing_strategy="bfd")
    return SFTConfig(**kw)


def count_tokens(trainer, pad_id: int, pending: list) -> None:
    """Wrap ``trainer.training_step`` to queue, per micro-batch, its token counts as device scalars.

    Per micro-batch: real tokens (ids that are not the pad id; documents never contain it),
    computed positions (``input_ids.numel()``, padding included), label tokens (``labels !=
    -100``) and documents (rows, or position-id restarts in a padding-free row). Four small
    reductions queued on the stream, read after the step's synchronization: no extra sync.
    """
    original = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        ids = inputs["input_ids"]
        real = ids != pad_id
        pos = inputs.get("position_ids")
        docs = ((pos == 0) & real).sum() if pos is not None else real.any(-1).sum()
        pending.append((real.sum(), ids.numel(), (inputs["labels"] != -100).sum(), docs))
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = training_step


def step_timer(mem, rec: dict, pending: list, warmup: int, flush):
    """A ``TrainerCallback`` timing each optimizer step between two synchronizations and storing
    that step's token counts (summed over its micro-batches) and the peak memory so far."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            mem.sync()
            pending.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            mem.sync()
            rec["step_s"].append(round(time.perf_counter() - self.t0, 5))
            sums = [int(sum(int(c[i]) for c in pending)) for i in range(4)]
            for key, v in zip(("real_tokens", "positions", "label_tokens", "docs"), sums):
                rec[key].append(v)
            rec["micro_batches"].append(len(pending))
            peak, reserved = mem.peak()
            retries = _alloc_retries()
            rec.setdefault("alloc_retries", []).append(retries)
            rec.update(peak_gib=round(peak, 4), reserved_peak_gib=None if reserved is None else round(reserved, 4),
                       steps_done=len(rec["step_s"]))
            flush()
            i = len(rec["step_s"])
            print(f"  step {i}{' (warm-up)' if i <= warmup else ''} {rec['step_s'][-1]:.3f}s real tokens {sums[0]} "
                  f"positions {sums[1]} docs {sums[3]} peak {peak:.2f} GiB alloc retries {retries}", flush=True)

    return StepTimer()


def _alloc_retries() -> int | None:
    """The CUDA caching allocator's retries so far (each frees cached blocks and synchronizes: a
    step that needed them is slow for memory, not compute); ``None`` off CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.memory_stats().get("num_alloc_retries", 0))


def batching_in_use(trainer) -> str:
    """What the trainer actually does after construction (Unsloth may change the config)."""
    args, coll = trainer.args, trainer.data_collator
    if getattr(args, "packing", False):
        return f"packed ({getattr(args, 'packing_strategy', '?')})"
    if getattr(coll, "padding_free", False) or getattr(args, "padding_free", False):
        return "padding-free"
    return "padded"


def summarize(rec: dict, warmup: int) -> None:
    """Medians, spread and totals over the timed steps (the warm-up steps excluded)."""
    step_s, real = rec["step_s"][warmup:], rec["real_tokens"][warmup:]
    if not step_s:
        rec["error"] = f"{rec.get('steps_done', 0)} steps done, not more than the {warmup} warm-up steps"
        return
    per_step = [r / s for r, s in zip(real, step_s)]
    mean_s = statistics.fmean(step_s)
    rec.update(timed_steps=len(step_s), real_tokens_per_s=round(statistics.median(per_step), 1),
               mean_real_tokens_per_s=round(sum(real) / sum(step_s), 1),
               median_step_s=round(statistics.median(step_s), 5), spread=round(max(step_s) / min(step_s), 4),
               step_cv=round(statistics.pstdev(step_s) / mean_s, 4),
               median_real_tokens_per_step=statistics.median(real),
               real_tokens_total=sum(rec["real_tokens"]), positions_total=sum(rec["positions"]),
               pad_fraction=round(1 - sum(rec["real_tokens"]) / max(1, sum(rec["positions"])), 4),
               activation_gib=round(max(0.0, rec["peak_gib"] - rec["after_load_gib"]), 4))


def process_setup(spec: dict) -> dict:
    """Import the stack, then TRL; the tokenizer and the dataset (CPU only): shared by the process's runs."""
    t0 = time.perf_counter()
    import torch

    for run in spec["runs"]:
        V.import_stack(run["stack_variant"])  # Unsloth before transformers; bitsandbytes for QLoRA
    from transformers import AutoTokenizer

    gpu = spec["device"] == "cuda"
    tok = AutoTokenizer.from_pretrained(spec["folder"])
    lens = D.lengths(spec["target_tokens"], spec["seed"], **spec["mix"])
    env = dict(gpu=torch.cuda.get_device_name(0) if gpu else None, versions=W.versions(),
               import_s=round(time.perf_counter() - t0, 2), cuda_alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
               dataset_docs=len(lens), dataset_tokens=sum(lens))
    return {"torch": torch, "mem": W.Memory(torch, gpu), "tok": tok, "env": env,
            "data": D.dataset(lens, len(tok), D.special_ids(tok), spec["seed"])}


def train(spec: dict, rec: dict, ctx: dict, flush) -> None:
    """Load + LoRA, build SFTTrainer, train one epoch, summarize."""
    from trl import SFTTrainer  # after the stack's import: Unsloth patches it

    torch, mem, tok = ctx["torch"], ctx["mem"], ctx["tok"]
    gpu = spec["device"] == "cuda"
    rec.update(ctx["env"], memory_kind=mem.kind)
    t1 = time.perf_counter()
    torch.manual_seed(spec["seed"])
    model, _, info = V.setup(rec["stack_variant"], spec["model"], spec["folder"], device=spec["device"],
                             dtype=spec["dtype"], max_seq=spec["max_length"], rank=spec["rank"], alpha=spec["rank"],
                             seed=spec["seed"])
    model.config.use_cache = False  # transformers derives document masks from position ids only without a cache
    rec.update(info, load_s=round(time.perf_counter() - t1, 2))
    out_dir = tempfile.mkdtemp(prefix="packing-trl-")
    try:
        t2 = time.perf_counter()
        trainer = SFTTrainer(model=model, args=sft_config(spec, rec, out_dir, gpu), train_dataset=ctx["data"],
                             processing_class=tok)
        pad_id = getattr(trainer.data_collator, "pad_token_id", None)
        pad_id = tok.pad_token_id if pad_id is None else pad_id
        rec.update(trainer_init_s=round(time.perf_counter() - t2, 2), batching_in_use=batching_in_use(trainer),
                   train_rows=len(trainer.train_dataset), trainer_class=type(trainer).__name__, pad_id=pad_id)
        pending: list = []
        count_tokens(trainer, pad_id, pending)
        trainer.add_callback(step_timer(mem, rec, pending, spec["warmup"], flush))
        mem.sync()
        rec["after_load_gib"] = round(mem.now(), 4)
        mem.reset_peak()
        flush()
        t3 = time.perf_counter()
        trainer.train()
        rec["train_s"] = round(time.perf_counter() - t3, 2)
        logs = trainer.state.log_history
        rec["losses"] = [h["loss"] for h in logs if "loss" in h]
        rec["trl_num_tokens"] = next((h["num_tokens"] for h in reversed(logs) if "num_tokens" in h), None)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    losses = rec["losses"]
    rec.update(loss0=losses[0] if losses else None, loss=losses[-1] if losses else None)
    summarize(rec, spec["warmup"])
    if not losses or not all(math.isfinite(x) for x in losses):
        rec.setdefault("error", f"no finite loss logged: {losses}")


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as fh:
        spec = json.load(fh)
    common = {k: spec[k] for k in ("model", "shape", "device", "dtype", "rank", "warmup", "seed", "tokens_per_step",
                                   "max_length", "lr")}
    common.update(kind="packing", alpha=spec["rank"], date=datetime.date.today().isoformat(),
                  pythonpath=os.environ.get("PYTHONPATH", ""))
    records = [dict(common, **run, step_s=[], real_tokens=[], positions=[], label_tokens=[], docs=[], micro_batches=[])
               for run in spec["runs"]]

    def flush():
        with open(spec["record"] + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=1)
        os.replace(spec["record"] + ".tmp", spec["record"])

    flush()
    try:
        ctx = process_setup(spec)
    except Exception as exc:  # noqa: BLE001 - a stack that does not import is a record, not a crash
        for r in records:
            r.update(W.error_record(exc))
        traceback.print_exc()
        flush()
        return 0
    for rec in records:
        print(f"# {rec['variant']}", flush=True)
        try:
            train(spec, rec, ctx, flush)
        except Exception as exc:  # noqa: BLE001 - record OOM and friends, go on with the next run
            rec.update(W.error_record(exc))
            traceback.print_exc()
        flush()
        gc.collect()  # the failed or finished run's model and trainer go before the next one loads
        if spec["device"] == "cuda":
            ctx["torch"].cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
