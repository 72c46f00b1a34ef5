"""One variant of the GRPO memory benchmark, in its own process (started by bench/grpo_memory.py).

Usage: ``python -P bench/grpo_memory_worker.py SPEC.json``. The spec names the variant, the model
folder (bench/e2e.py's prepared checkpoint), the workload (prompt tokens, completion tokens, group
size), the steps, ``cap_gib`` (the longest-completion probes), ``generation`` and the ``record``
path. Order of work:

1. import the variant's stack (corept first for corept variants: its allocator setting), cap the
   process's GPU memory if asked, build the word-level tokenizer and the random-token prompts;
2. load the model and add LoRA the variant's way: ``hf*`` = ``from_pretrained`` (+ bitsandbytes
   NF4 for ``hf_qlora``) and a ``LoraConfig`` handed to ``GRPOTrainer`` with TRL's own gradient
   checkpointing (``GRPOConfig(gradient_checkpointing=True)``); ``corept*`` = ``corept.load`` +
   ``corept.get_peft_model`` (defaults, or ``use_gradient_checkpointing="corept"`` for ``*_lean``)
   and ``gradient_checkpointing=False`` in the config, inside ``trl_head_scope``;
3. ``trainer.train()`` for warm-up + timed steps. Each completion is exactly ``completion_tokens``
   long (``generation_kwargs={"min_new_tokens": L}`` with ``max_completion_length=L``: EOS is
   masked until L), so memory does not depend on what the random model samples. A callback times
   every optimizer step; a wrapper around ``_generate_single_turn`` splits it into generation and
   the rest (scoring, loss forward/backward, optimizer) and resets the peak between them, so the
   record says which phase sets the peak. ``generation: "prefill"`` (longest-completion probes
   only) replaces sampling by random completion tokens fed through the model in 256-token chunks
   per row with the KV cache (:func:`prefill_generation`): the cache sampling's last token holds,
   with prompt-prefill-sized transients, in seconds instead of minutes of decode steps;
4. ``generate()`` speed (``gen_tokens`` > 0): greedy, KV cache, ``gen_batch`` copies of the
   prompt, exactly ``gen_tokens`` new tokens; hf times its peft model, corept its patched model,
   then ``corept.unpatch(model)`` and the same call again.

The record is rewritten after every step, so a killed worker still leaves what it measured.
Memory on CUDA is ``torch.cuda`` allocated bytes; on CPU (dry run) the process's RSS.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.util
import inspect
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
P = _sibling("preference_memory_worker")  # checkpointing_in_use(), has_trl_head()
LOGGED = ("loss", "reward", "reward_std", "grad_norm", "entropy", "completions/mean_length",
          "completions/min_length", "completions/max_length", "completions/clipped_ratio", "num_tokens")


def varying_reward(completions, **_):
    """A reward that differs between completions of a group, so the advantages (and gradients) are not zero."""
    return [float(sum(map(ord, c if isinstance(c, str) else str(c))) % 7) for c in completions]


def allowed_ids(torch, vocab: int, tok) -> "torch.Tensor":
    """Token ids prompts and stand-in completions draw from: not bos/eos/pad/unk."""
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    return torch.tensor([i for i in range(vocab) if i not in special])


def make_prompts(torch, ok, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 7919 + length)
    return [ok[torch.randint(0, len(ok), (length,), generator=g)].tolist() for _ in range(n)]


def build(spec: dict):
    """The model on the device and, for hf variants, the ``LoraConfig`` TRL applies (TRL's documented path)."""
    import torch
    from peft import LoraConfig

    tdt = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    variant, quant = spec["variant"], "_qlora" in spec["variant"]
    if variant.startswith("corept"):
        import corept

        model, _ = corept.load(spec["folder"], max_seq_length=spec["prompt_tokens"] + spec["completion_tokens"],
                               dtype=tdt, load_in_4bit=quant)
        ckpt = {"use_gradient_checkpointing": "corept"} if variant.endswith("_lean") else {}
        model = corept.get_peft_model(model, r=spec["rank"], lora_alpha=spec["rank"], lora_dropout=0.0,
                                      target_modules=list(V.LORA_TARGETS), random_state=V.LORA_SEED, **ckpt)
        rep = corept.report(model)
        return model, None, {"loaded_with": "corept.load + corept.get_peft_model", "corept_applied": dict(rep.applied),
                             "corept_fallbacks": dict(rep.fallbacks), "corept_settings": dict(rep.settings)}
    model = V._hf_load(spec["folder"], spec["device"], tdt, quant)  # from_pretrained (+ NF4 double-quant)
    torch.manual_seed(V.LORA_SEED)
    cfg = LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], lora_dropout=0.0, target_modules=list(V.LORA_TARGETS),
                     bias="none", task_type="CAUSAL_LM")
    return model, cfg, {"loaded_with": "from_pretrained + peft_config=LoraConfig"}


def grpo_args(spec: dict, out_dir: str, gpu: bool):
    from trl import GRPOConfig

    L = spec["completion_tokens"]
    return GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=spec["batch"], num_generations=spec["group"],
        max_completion_length=L, generation_kwargs={"min_new_tokens": L}, beta=0.0,
        max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], optim=spec["optim"], logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=spec["seed"],
        data_seed=spec["seed"], use_cpu=not gpu, bf16=gpu and spec["dtype"] == "bf16", log_completions=False,
        # TRL's checkpointing for hf (its default); corept's own is installed on each layer and HF's would replace it
        gradient_checkpointing=not spec["variant"].startswith("corept"))


@contextlib.contextmanager
def forward_scope(model):
    """Put the base model's instance ``forward`` back after TRL's fused head wrapped it (what corept's
    ``trl_head_scope`` does; used for hf, which runs without corept)."""
    base = P._base(model)
    saved = base.__dict__.get("forward")
    try:
        yield
    finally:
        base.__dict__.pop("forward", None)
        if saved is not None:
            base.__dict__["forward"] = saved


PREFILL_CHUNK = 256
"""Tokens per row of each cache-filling forward of the ``prefill`` stand-in (the prompt's length)."""


def prefill_generation(trainer, length: int, ok, seed: int):
    """A stand-in for ``trainer._generate_single_turn``: random completions of ``length`` tokens, then
    prompt + completion fed to the model in chunks of :data:`PREFILL_CHUNK` tokens per row, no grad,
    ``use_cache=True``, in TRL's generation context (its checkpointing off). The KV cache grows to
    the size sampling's last token has, chunk by chunk (``torch.cat`` per layer, as sampling's
    growth does), while the transient activations stay those of a ``rows x 256``-token call (the
    real prompt prefill's): sampling's memory without its thousands of sequential decode steps."""
    import torch
    from trl.models import unwrap_model_for_generation

    g = torch.Generator().manual_seed(seed)
    pad = trainer.processing_class.pad_token_id
    # transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name is deprecated; a forward
    # that fills unset arguments from the signature passes cache=None beside it, and the old one is dropped)
    params = inspect.signature(type(P._base(trainer.model)).forward).parameters
    name = "cache" if "cache" in params else "past_key_values"

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        width = max(len(p) for p in prompt_ids)
        comp = ok[torch.randint(0, len(ok), (len(prompt_ids), length), generator=g)]
        dev = trainer.accelerator.device
        ids = torch.cat([torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids]), comp], 1).to(dev)
        mask = torch.cat([torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids]),
                          torch.ones_like(comp)], 1).to(dev)
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                         gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs) as m, \
                torch.no_grad():
            cache = None
            for start in range(0, ids.shape[1], PREFILL_CHUNK):
                end = min(start + PREFILL_CHUNK, ids.shape[1])
                pos = (mask[:, :end].cumsum(-1) - 1).clamp(min=0)[:, start:end]
                out = m(input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos,
                        use_cache=True, logits_to_keep=1, **{name: cache})
                cache = out[name]
                del out
            filled = cache.get_seq_length()
            del cache
        if filled != ids.shape[1]:
            raise RuntimeError(f"prefill stand-in: the KV cache holds {filled} positions, not {ids.shape[1]}")
        return comp.tolist(), None

    return generate


def phase_timer(trainer, mem, rec: dict, warmup: int, flush):
    """Time each optimizer step and its generation; peak memory of generation and of the rest apart.

    The peak is reset at the step's start and again when generation ends: ``gen_peak_gib`` covers
    sampling (KV cache), ``train_peak_gib`` scoring + loss forward/backward + optimizer step.
    """
    from transformers import TrainerCallback

    cur: dict = {}
    inner = trainer._generate_single_turn

    def generate(*args, **kwargs):
        mem.sync()
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        mem.sync()
        cur.update(gen_s=time.perf_counter() - t, gen_peak=mem.peak()[0])
        mem.reset_peak()
        return out

    trainer._generate_single_turn = generate

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            mem.sync()
            mem.reset_peak()
            cur.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            mem.sync()
            step = time.perf_counter() - self.t0
            train_peak, reserved = mem.peak()
            gen_s, gen_peak = cur.get("gen_s", 0.0), cur.get("gen_peak", 0.0)
            rec["step_s"].append(round(step, 4))
            rec["gen_s"].append(round(gen_s, 4))
            rec["gen_peak_gib"].append(round(gen_peak, 4))
            rec["train_peak_gib"].append(round(train_peak, 4))
            peak = max(rec["gen_peak_gib"] + rec["train_peak_gib"])
            rec.update(peak_gib=round(peak, 4), steps_done=len(rec["step_s"]),
                       peak_phase="generation" if max(rec["gen_peak_gib"]) >= max(rec["train_peak_gib"]) else "training",
                       reserved_peak_gib=None if reserved is None else round(max(reserved, rec.get("reserved_peak_gib")
                                                                                 or 0.0), 4))
            flush()
            i = len(rec["step_s"])
            print(f"  {rec['variant']} L{rec['completion_tokens']} step {i}{' (warm-up)' if i <= warmup else ''} "
                  f"{step:.2f}s (generation {gen_s:.2f}s) peak generation {gen_peak:.2f} / training "
                  f"{train_peak:.2f} GiB", flush=True)

    return Timer()


def time_generate(torch, model, ids, new_tokens: int, mem, tok) -> dict:
    """Greedy ``generate()`` of exactly ``new_tokens`` for the batch ``ids`` (KV cache), after a
    2-token warm-up call; tokens/s = rows x new tokens / seconds between two synchronizations."""
    was = model.training
    model.eval()
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1, use_cache=True,
              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, temperature=None, top_p=None, top_k=None)
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, **kw)
            mem.sync()
            t = time.perf_counter()
            out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            mem.sync()
            dt = time.perf_counter() - t
    finally:
        model.train(was)
    new = out[:, ids.shape[1]:].cpu()
    return {"s": round(dt, 4), "tok_s": round(new.numel() / dt, 1), "tokens": new}


def measure_generate(torch, model, rec: dict, spec: dict, prompt: list[int], mem, tok, flush) -> None:
    """``generate()`` tokens/s of the trained model: hf's peft model; corept patched, then unpatched."""
    dev = "cuda" if spec["device"] == "cuda" else "cpu"
    ids = torch.tensor([prompt] * spec["gen_batch"], device=dev)
    n = spec["gen_tokens"]
    rec["generate"] = g = {"batch": spec["gen_batch"], "prompt_tokens": len(prompt), "new_tokens": n}
    first = time_generate(torch, model, ids, n, mem, tok)
    key = "patched" if spec["variant"].startswith("corept") else "peft"
    g[f"{key}_tok_s"], g[f"{key}_s"] = first["tok_s"], first["s"]
    flush()
    if key == "patched":
        import corept

        corept.unpatch(model)
        g["unpatched_forwards_left"] = sum("forward" in m.__dict__ for m in model.modules())
        second = time_generate(torch, model, ids, n, mem, tok)
        g.update(unpatched_tok_s=second["tok_s"], unpatched_s=second["s"],
                 speedup=round(first["tok_s"] / second["tok_s"], 3))
        same = (first["tokens"] == second["tokens"])
        diff = (~same.all(0)).nonzero()
        g.update(greedy_rows_identical=int(same.all(1).sum()), first_difference=int(diff[0]) if len(diff) else None)


def run(spec: dict, rec: dict, mem, flush) -> None:
    import datasets
    import torch
    from trl import GRPOTrainer

    gpu = spec["device"] == "cuda"
    config = V.make_config(spec["model"])
    tok = V.make_tokenizer(config)
    ok = allowed_ids(torch, config.vocab_size, tok)
    prompts = make_prompts(torch, ok, spec["warmup"] + spec["steps"], spec["prompt_tokens"], spec["seed"])
    data = datasets.Dataset.from_list([{"prompt": " ".join(f"<t{i}>" for i in p)} for p in prompts])
    rec["prompt_tokens_tokenized"] = len(tok(text=data[0]["prompt"])["input_ids"])
    t0 = time.perf_counter()
    model, peft_config, info = build(spec)
    rec.update(info, load_s=round(time.perf_counter() - t0, 2))
    variant = spec["variant"]
    if variant.startswith("corept"):
        from corept.training.compat import trl_head_scope as scope
    else:
        scope = forward_scope
    out_dir = tempfile.mkdtemp(prefix="grpomem-trl-")
    t1 = time.perf_counter()
    with scope(model):
        trainer = GRPOTrainer(model=model, reward_funcs=[varying_reward], args=grpo_args(spec, out_dir, gpu),
                              train_dataset=data, processing_class=tok, peft_config=peft_config)
        pm = trainer.model
        if spec["generation"] == "prefill":
            trainer._generate_single_turn = prefill_generation(trainer, spec["completion_tokens"], ok, spec["seed"])
        trainer.add_callback(phase_timer(trainer, mem, rec, spec["warmup"], flush))
        n4 = sum(1 for m in pm.modules() if type(m).__module__.startswith("bitsandbytes") and "4bit" in type(m).__name__)
        if "_qlora" in variant and n4 == 0:
            raise RuntimeError(f"{variant}: no 4-bit linear layer after loading")
        rec.update(trainer_init_s=round(time.perf_counter() - t1, 2), linear4bit_modules=n4,
                   loss_type=trainer.args.loss_type, fused_head_wrapper=P.has_trl_head(pm),
                   checkpointing_before=P.checkpointing_in_use(pm),
                   trainable_params=sum(p.numel() for p in pm.parameters() if p.requires_grad),
                   lora_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in pm.parameters() if p.requires_grad}))
        mem.sync()
        rec["after_load_gib"] = round(mem.now(), 4)
        flush()
        trainer.train()
        rec["checkpointing_after"] = P.checkpointing_in_use(pm)
        logs = [{k: h[k] for k in LOGGED if isinstance(h.get(k), (int, float))} for h in trainer.state.log_history
                if "loss" in h]
        del trainer
    w = spec["warmup"]
    timed, gen = rec["step_s"][w:] or rec["step_s"][-1:], rec["gen_s"][w:] or rec["gen_s"][-1:]
    losses = [h["loss"] for h in logs]
    rec.update(trl_logs=logs, losses=losses, loss0=losses[0] if losses else None, loss=losses[-1] if losses else None,
               rewards=[h.get("reward") for h in logs], grad_norms=[h.get("grad_norm") for h in logs],
               completion_lengths=sorted(({h.get("completions/min_length") for h in logs}
                                          | {h.get("completions/max_length") for h in logs}) - {None}),
               median_step_s=round(statistics.median(timed), 4), median_gen_s=round(statistics.median(gen), 4),
               median_train_s=round(statistics.median(s - g for s, g in zip(timed, gen)), 4),
               activation_gib=round(max(0.0, rec["peak_gib"] - rec["after_load_gib"]), 4))
    rec["sampled_tok_s"] = round(spec["group"] * spec["completion_tokens"] / rec["median_gen_s"], 1) \
        if rec["median_gen_s"] and spec["generation"] == "sample" else None
    if not losses or not all(math.isfinite(x) for x in losses):
        rec["error"] = f"no finite loss logged: {losses}"
    shutil.rmtree(out_dir, ignore_errors=True)
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    if spec["gen_tokens"] > 0 and "error" not in rec:
        per_token = rec["median_gen_s"] / max(1, spec["completion_tokens"])  # sampling's seconds per token
        need = 10 + per_token * spec["gen_tokens"] * (3 if variant.startswith("corept") else 1.5)
        if spec["deadline"] - time.time() < need:
            rec["generate"] = {"skipped": f"{spec['deadline'] - time.time():.0f}s left, ~{need:.0f}s needed"}
        else:
            measure_generate(torch, pm, rec, spec, prompts[0], mem, tok, flush)
    rec["done"] = True


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as fh:
        spec = json.load(fh)
    keys = ("kind", "variant", "model", "device", "dtype", "rank", "warmup", "steps", "optim", "prompt_tokens",
            "completion_tokens", "group", "batch", "generation", "cap_gib")
    rec = dict({k: spec.get(k) for k in keys}, date=datetime.date.today().isoformat(),
               pythonpath=os.environ.get("PYTHONPATH", ""), step_s=[], gen_s=[], gen_peak_gib=[], train_peak_gib=[])

    def flush():
        with open(spec["record"] + ".tmp", "w", encoding="utf-8") as fh:
            json.dump([rec], fh, indent=1, default=str)
        os.replace(spec["record"] + ".tmp", spec["record"])

    flush()
    try:
        t0 = time.perf_counter()
        import torch

        V.import_stack(spec["variant"])  # corept first (allocator setting); bitsandbytes for *_qlora
        import trl  # noqa: F401

        gpu = spec["device"] == "cuda"
        if gpu and spec.get("cap_gib"):
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gib"] * GIB / total))
        mem = W.Memory(torch, gpu)
        rec.update(gpu=torch.cuda.get_device_name(0) if gpu else None, versions=W.versions(), memory_kind=mem.kind,
                   cuda_alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), import_s=round(time.perf_counter() - t0, 2))
        flush()
        run(spec, rec, mem, flush)
    except Exception as exc:  # noqa: BLE001 - OOM and friends are a record, not a crash
        rec.update(W.error_record(exc))
        traceback.print_exc()
    flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
