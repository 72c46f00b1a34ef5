"""One variant of the DPO/KTO memory benchmark, in its own process (started by bench/preference_memory.py).

Usage: ``python -P bench/preference_memory_worker.py SPEC.json``. The spec names the variant, the
runs (``[[method, length], ...]``), the model, sizes, the device, an absolute ``deadline`` and the
``record`` path. Order of work:

1. import the stack (torch, transformers, peft, trl, datasets; corept for ``corept``), build the
   word-level tokenizer and every run's random-token ``datasets.Dataset``: CPU only;
2. with ``gate`` set, print ``READY`` and wait for a ``go`` line on stdin (the driver lets the next
   variant import while this one's predecessor still trains; nothing touches the GPU before ``go``);
3. per run: build the model (random seeded weights, on the device), add LoRA the variant's way,
   build TRL's ``DPOTrainer`` / ``KTOTrainer``, then ``trainer.train()`` for warm-up + timed steps,
   timed by a callback between two synchronizations; free everything before the next run.

Records (one per run) are rewritten after every step, so a killed worker still leaves what it measured.
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

GIB = 2**30
_HERE = os.path.dirname(os.path.abspath(__file__))


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"corept_bench_{name}", os.path.join(_HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


W, V = _sibling("e2e_worker"), _sibling("e2e_variants")  # Memory, versions(), error_record(); models, tokenizer

HEAD = {"hf": "trl_fused", "corept": "trl_fused", "hf_logits": "full_logits"}


def _words(ids) -> str:
    return " ".join(f"<t{i}>" for i in ids)


def make_dataset(method: str, length: int, rows: int, vocab: int, avoid: set, seed: int):
    """Random-token rows for ``method`` whose prompt + completion (+ eos) is ``length`` tokens.

    The word-level tokenizer maps ``<tN>`` to id N, so these strings are token ids spelled out;
    completions end with an explicit `` <|eos|>`` (TRL then adds none).
    """
    import datasets
    import torch

    g = torch.Generator().manual_seed(seed * 7919 + length)
    ok = torch.tensor([i for i in range(vocab - 2) if i not in avoid])
    draw = lambda n: ok[torch.randint(0, len(ok), (n,), generator=g)].tolist()  # noqa: E731
    p_len = length // 2
    c_len = length - p_len - 1
    out = []
    for i in range(rows):
        prompt = _words(draw(p_len))
        if method == "dpo":
            out.append({"prompt": prompt, "chosen": " " + _words(draw(c_len)) + " <|eos|>",
                        "rejected": " " + _words(draw(c_len)) + " <|eos|>"})
        else:
            out.append({"prompt": prompt, "completion": " " + _words(draw(c_len)) + " <|eos|>", "label": i % 2 == 0})
    return datasets.Dataset.from_list(out)


def full_logits_head(model) -> None:
    """Replace TRL's fused head on ``model`` by full-vocabulary logits and an fp32 log-softmax.

    This emulates the log-prob path TRL used before its fused head: ``[rows, tokens, vocab]``
    logits of the whole batch, upcast, ``log_softmax``, gather. Metrics-only outputs (entropy,
    mean logit, top-1) are computed row by row without gradient so they add little.
    """
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    cls_forward = type(model).forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw):
        if not fused_lm_head:
            return cls_forward(self, *args, labels=labels, **kw)
        kw["use_cache"] = False
        logits = cls_forward(self, *args, **kw).logits[:, :-1]
        labels = labels[:, 1:].to(logits.device)
        mask = labels != -100
        logp = logits.float().log_softmax(-1)
        log_probs = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        with torch.no_grad():
            ent, mean, top1 = [], [], []
            for r in range(logits.shape[0]):
                lr = logp[r]
                ent.append(-(lr.exp() * lr).sum(-1))
                mean.append(logits[r].float().mean(-1))
                top1.append(logits[r].argmax(-1) == labels[r])
            entropy, mean_logits = torch.stack(ent) * mask, torch.stack(mean) * mask
            is_top1 = torch.stack(top1) & mask
        n = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / n, log_probs=log_probs, entropy=entropy,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_trl_head(model) -> bool:
    fwd = _base(model).__dict__.get("forward")
    code = getattr(getattr(fwd, "__func__", fwd), "__code__", None)
    return code is not None and "fused_lm_head" in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


def checkpointing_in_use(model) -> str:
    """Which checkpoint function the decoder layers call now: corept's, transformers' or none."""
    names = set()
    for m in _base(model).modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            f = m._gradient_checkpointing_func
            q = getattr(getattr(f, "func", f), "__qualname__", repr(f))
            reentrant = (getattr(f, "keywords", None) or {}).get("use_reentrant")
            names.add("corept" if "make_checkpoint_func" in q else
                      f"transformers (use_reentrant={reentrant})" if q == "checkpoint" else q)
    return ",".join(sorted(names)) or "off"


def trl_args(method: str, spec: dict, length: int, out_dir: str, gpu: bool, variant: str):
    from trl import DPOConfig, KTOConfig

    common = dict(output_dir=out_dir, per_device_train_batch_size=spec["batch"][method],
                  max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], logging_steps=1,
                  save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
                  seed=spec["seed"], data_seed=spec["seed"], optim=spec["optim"], max_length=length,
                  use_cpu=not gpu, bf16=gpu, beta=0.1, precompute_ref_log_probs=False,
                  # corept installs its own checkpointing on each layer; HF's would replace it
                  gradient_checkpointing=(variant != "corept"))
    return DPOConfig(**common) if method == "dpo" else KTOConfig(**common)


def build(spec: dict, variant: str, tok, folder: str | None):
    """The model on the device and, for hf/hf_logits, the LoraConfig TRL applies (TRL's own path)."""
    import torch
    from peft import LoraConfig

    tdt = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    info: dict = {}
    if variant == "corept":
        import corept

        if folder:  # corept.load reads the saved checkpoint (the CPU dry run; --weights checkpoint)
            model, _ = corept.load(folder, max_seq_length=spec["max_len"], dtype=tdt)
            info["loaded_with"] = "corept.load"
        else:  # the same seeded weights built on the device; corept.patch is what corept.load applies
            model = corept.patch(V.build_random(spec["model"], spec["seed"], spec["device"], spec["dtype"]))
            info["loaded_with"] = "config build + corept.patch"
        model = corept.get_peft_model(model, r=spec["rank"], lora_alpha=spec["rank"], lora_dropout=0.0,
                                      target_modules=list(V.LORA_TARGETS), use_gradient_checkpointing="corept",
                                      random_state=V.LORA_SEED)
        rep = corept.report(model)
        info.update(corept_applied=dict(rep.applied), corept_fallbacks=dict(rep.fallbacks))
        return model, None, info
    if folder:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=tdt, attn_implementation="sdpa",
                                                     device_map={"": 0} if spec["device"] == "cuda" else None)
        info["loaded_with"] = "from_pretrained"
    else:
        model = V.build_random(spec["model"], spec["seed"], spec["device"], spec["dtype"])
        info["loaded_with"] = "config build"
    torch.manual_seed(V.LORA_SEED)
    cfg = LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], lora_dropout=0.0, target_modules=list(V.LORA_TARGETS),
                     bias="none", task_type="CAUSAL_LM")
    return model, cfg, info


def make_timer(mem, rec: dict, warmup: int, flush):
    """A ``TrainerCallback`` timing each optimizer step between two synchronizations; peak memory after it."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            mem.sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            mem.sync()
            rec["step_s"].append(round(time.perf_counter() - self.t0, 4))
            peak, reserved = mem.peak()
            rec["peak_after_step_gib"].append(round(peak, 4))
            rec.update(peak_gib=round(peak, 4), steps_done=len(rec["step_s"]),
                       reserved_peak_gib=None if reserved is None else round(reserved, 4))
            flush()
            i = len(rec["step_s"])
            print(f"  {rec['variant']} {rec['method']} L{rec['length']} step {i}"
                  f"{' (warm-up)' if i <= warmup else ''} {rec['step_s'][-1]:.3f}s peak {peak:.2f} GiB", flush=True)

    return Timer()


def run_one(spec: dict, rec: dict, tok, data, mem, flush) -> None:
    import torch
    from trl import DPOTrainer, KTOTrainer

    method, length, variant = rec["method"], rec["length"], spec["variant"]
    t_run = time.perf_counter()
    gpu = spec["device"] == "cuda"
    rec["allocated_before_gib"] = round(mem.now(), 4)
    t0 = time.perf_counter()
    model, peft_config, info = build(spec, variant, tok, spec.get("folder"))
    rec.update(info, build_s=round(time.perf_counter() - t0, 2))
    t1 = time.perf_counter()
    Trainer = DPOTrainer if method == "dpo" else KTOTrainer
    out_dir = tempfile.mkdtemp(prefix="prefmem-trl-")
    trainer = Trainer(model=model, ref_model=None, args=trl_args(method, spec, length, out_dir, gpu, variant),
                      train_dataset=data, processing_class=tok, peft_config=peft_config)
    if variant == "corept":
        from corept.training.trainers import use_disabled_adapter_reference

        rec["ref_adapter_deleted"] = use_disabled_adapter_reference(trainer.model)
    if variant == "hf_logits":
        full_logits_head(_base(trainer.model))
    pm = trainer.model
    rec.update(trainer_init_s=round(time.perf_counter() - t1, 2), logprob_head=HEAD[variant],
               fused_head_wrapper=has_trl_head(pm),
               reference="ref adapter copy" if "ref" in getattr(pm, "peft_config", {}) else "adapter disabled",
               checkpointing_before=checkpointing_in_use(pm),
               trainable_params=sum(p.numel() for p in pm.parameters() if p.requires_grad),
               lora_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in pm.parameters() if p.requires_grad}))
    trainer.add_callback(make_timer(mem, rec, spec["warmup"], flush))
    mem.sync()
    rec["after_load_gib"] = round(mem.now(), 4)
    mem.reset_peak()
    flush()
    trainer.train()
    rec["checkpointing_after"] = checkpointing_in_use(pm)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = rec["step_s"][spec["warmup"]:] or rec["step_s"][-1:]
    tokens = rec["rows_per_step"] * length
    rec.update(losses=losses, loss0=losses[0] if losses else None, loss=losses[-1] if losses else None,
               median_step_s=round(statistics.median(timed), 4),
               tokens_per_s=round(tokens * len(timed) / sum(timed), 1),
               activation_gib=round(max(0.0, rec["peak_gib"] - rec["after_load_gib"]), 4))
    rec["run_wall_s"] = round(time.perf_counter() - t_run, 2)
    if not losses or not all(math.isfinite(x) for x in losses):
        rec["error"] = f"no finite loss logged: {losses}"
    del trainer, model, pm
    shutil.rmtree(out_dir, ignore_errors=True)
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as fh:
        spec = json.load(fh)
    variant = spec["variant"]
    base = dict(kind="prefmem", variant=variant, model=spec["model"], device=spec["device"], dtype=spec["dtype"],
                rank=spec["rank"], warmup=spec["warmup"], steps=spec["steps"], optim=spec["optim"],
                date=datetime.date.today().isoformat(), pythonpath=os.environ.get("PYTHONPATH", ""))
    # batch: DPO pairs (chosen and rejected go through one forward: 2 rows each), KTO rows
    records = [dict(base, method=m, length=n, batch=spec["batch"][m],
                    rows_per_step=spec["batch"][m] * (2 if m == "dpo" else 1), step_s=[], peak_after_step_gib=[])
               for m, n in spec["runs"]]

    def flush():
        with open(spec["record"] + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=1)
        os.replace(spec["record"] + ".tmp", spec["record"])

    flush()
    try:
        t0 = time.perf_counter()
        import torch

        __import__("corept" if variant == "corept" else "peft")
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401

        gpu = spec["device"] == "cuda"
        env = {"gpu": None, "versions": W.versions(), "memory_kind": "cuda_allocated" if gpu else "cpu_rss",
               "import_s": round(time.perf_counter() - t0, 2)}
        config = V.make_config(spec["model"])
        tok = V.make_tokenizer(config)
        avoid = {config.bos_token_id, config.eos_token_id}
        data = [make_dataset(m, n, spec["batch"][m] * (spec["warmup"] + spec["steps"]), config.vocab_size, avoid,
                             spec["seed"]) for m, n in spec["runs"]]
        env["prep_s"] = round(time.perf_counter() - t0, 2)
        for r in records:
            r.update(env)
        flush()
        if spec.get("gate"):
            print("READY", flush=True)
            if sys.stdin.readline().strip() != "go":
                for r in records:
                    r.update(error="not started: the driver's budget ran out", skipped=True)
                flush()
                return 0
        mem = W.Memory(torch, gpu)
        if gpu:
            env["gpu"] = torch.cuda.get_device_name(0)
            for r in records:
                r["gpu"] = env["gpu"]
    except Exception as exc:  # noqa: BLE001 - a stack that does not import is a record
        for r in records:
            r.update(W.error_record(exc))
        traceback.print_exc()
        flush()
        return 0
    for rec, ds in zip(records, data):
        left = spec["deadline"] - time.time()
        need = spec["min_run_s"] * rec["length"] / 2048 * (1.4 if rec["method"] == "kto" else 1.0)
        if left < need:
            rec.update(error=f"skipped: {left:.0f}s left of the budget, ~{need:.0f}s needed", skipped=True)
            flush()
            continue
        try:
            run_one(spec, rec, tok, ds, mem, flush)
        except Exception as exc:  # noqa: BLE001 - record OOM and friends, go on with the next run
            rec.update(W.error_record(exc))
            traceback.print_exc()
        flush()
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
