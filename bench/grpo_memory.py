"""GRPO memory benchmark: TRL's GRPOTrainer on plain HF + peft vs corept, side by side.

    bash bench/run_e2e_h200.sh grpo                 # the GPU call (wheels, checkpoint, then this)
    python3 -P bench/grpo_memory.py --out $OUT --site-base /tmp/site_base --site-corept /tmp/site_corept
    python3 -P bench/grpo_memory.py --variants none --maxlen corept_qlora_lean --out $OUT ...  # longest completion
    python3 -P bench/grpo_memory.py --device cpu --tiny --out /tmp/grpomem     # CPU dry run (the test runs it)

**Why.** GRPO's memory is set by the group: ``num_generations`` completions of one prompt are
sampled with the KV cache, then scored and trained on in one batch (here 8 x (256 + 1024) tokens).
The target is corept's peak at most half of plain HF + peft's at the same workload.

**Variants** (each in its own subprocess, bench/grpo_memory_worker.py; PYTHONPATH per stack from
``--site-*``, checkpoints from bench/e2e.py's ``prepare``: random weights of the public configs):

* ``hf``: ``AutoModelForCausalLM.from_pretrained`` + ``peft_config=LoraConfig(r16, alpha 16, the 7
  projections)`` passed to ``GRPOTrainer`` (TRL wraps the model), TRL's gradient checkpointing
  (``GRPOConfig(gradient_checkpointing=True)``, its default): what TRL documents;
* ``corept``: ``corept.load`` + ``corept.get_peft_model`` (same LoRA) with corept's defaults
  (checkpointing ``"auto"``), ``gradient_checkpointing=False`` in the config, the trainer's life
  inside ``corept.training.compat.trl_head_scope``; ``corept_lean``: ``use_gradient_checkpointing="corept"``;
* ``hf_qlora``, ``corept_qlora``, ``corept_qlora_lean``: the same on NF4 double-quant weights
  (``BitsAndBytesConfig``, bf16 compute / ``corept.load(load_in_4bit=True)``).

**Workload** (all flags): one prompt of ``--prompt-tokens`` (256) random tokens per step, a group
of ``--group`` (8) completions (``num_generations = per_device_train_batch_size``), each exactly
``--completion-tokens`` (1024) long (``max_completion_length=L`` and ``generation_kwargs=
{"min_new_tokens": L}``: EOS is masked until L), sampled at TRL's defaults; a reward that varies
between completions; ``beta=0`` (TRL's default: no reference forward); bf16; ``--warmup`` (1) +
``--steps`` (2) optimizer steps of ``trainer.train()``.

**Measures** per variant: ``after_load`` = allocated after model + adapters + trainer; ``peak`` =
max allocated over all steps, with generation (sampling) and the rest (scoring, loss
forward/backward, optimizer) measured apart; ``x hf`` = peak / hf's peak (QLoRA: / hf_qlora's);
step, generation and rest seconds (medians over the timed steps); TRL's logged loss, reward,
grad norm and completion lengths; then ``generate()`` speed: greedy, KV cache, ``--gen-batch``
(8) rows x ``--gen-tokens`` (256) new tokens: hf's peft model; corept patched, then after
``corept.unpatch`` (the issue's "patched vs unpatched").

**Longest completion** (``--maxlen VARIANTS``): the largest ``--maxlen-step`` multiple of the
completion length that trains ``--maxlen-steps`` (2) steps under ``--cap-gib`` (24;
``torch.cuda.set_per_process_memory_fraction``), searched like bench/e2e.py's ``--maxseq``
(bench/e2e_maxseq.py: double from ``--maxlen-start``, then bisect), one subprocess per probe.
Sampling 8 x 10k tokens one decode step at a time takes many minutes, so probes default to
``--maxlen-generation prefill``: random completions fed through the model in 256-token chunks per
row with the KV cache (no grad): the cache grows to what sampling's last token holds, while the
transients stay those of the real prompt prefill; ``sample`` runs TRL's real sampling.

Results: ``grpomem-<date>-<tag>.json`` + ``.md`` under ``--out`` (rewritten after every
record), worker logs under ``--out/logs``. This process imports nothing but the standard library.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "grpo_memory_worker.py")
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path.pop(0)  # bench/kernels.py must never shadow the `kernels` package


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"corept_bench_{name}", os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


E2E = _sibling("e2e")
V, MS, REP = E2E.V, E2E.MS, E2E.REP

VARIANTS = ("hf", "corept", "corept_lean", "hf_qlora", "corept_qlora", "corept_qlora_lean")
"""Names shared with bench/e2e_variants.py (its ``STACK_OF`` picks each one's PYTHONPATH)."""
TARGET = 0.5
"""The issue's target: corept's peak at most this fraction of hf's."""


def _quant(variant: str) -> bool:
    return "_qlora" in variant


class GrpoDriver(E2E.Driver):
    """bench/e2e.py's driver (checkpoint preparation, per-stack PYTHONPATH, subprocesses, budget),
    with GRPO's runs, its time estimates and its results files."""

    def __init__(self, args):
        super().__init__(args)
        self.command = "python3 -P bench/grpo_memory.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
        self.learned: dict[bool, dict] = {}  # per quantized-or-not: seconds per sampled token, fixed, per trained token
        self.started = 0  # runs started: the first always starts (nothing is measured yet)

    def add(self, rec: dict) -> None:
        rec.setdefault("command", self.command)
        rec.setdefault("date", time.strftime("%Y-%m-%d"))
        self.records.append(rec)
        write(self.records, self.a.out, self.a.tag)

    # ------------------------------------------------------------------ time estimates
    def estimate(self, variant: str, length: int, steps: int, generation: str, gen_tokens: int) -> float:
        """Seconds one worker should take: imports + load, ``steps`` of generation and training,
        and the ``generate()`` timing (twice for corept); learned from earlier runs of the same kind."""
        a, q = self.a, _quant(variant)
        k = self.learned.get(q, {})
        lat = k.get("lat", a.gen_s_per_token * (2.0 if q else 1.0))  # sampling: seconds per token (a whole group)
        per_tok = k.get("train", a.train_s_per_ktok / 1000)  # rest of a step: seconds per trained token
        fixed = k.get("fixed", a.import_s + (20.0 if q else 10.0))
        rows = a.group * (a.prompt_tokens + length)
        gen = lat * length if generation == "sample" else 1.5 * per_tok * rows
        timing = lat * gen_tokens * (2 if variant.startswith("corept") else 1) + (10 if gen_tokens else 0)
        return 1.15 * (fixed + steps * (gen + per_tok * rows) + timing)

    def learn(self, variant: str, r: dict) -> None:
        k = self.learned.setdefault(_quant(variant), {})
        fixed = sum(r.get(x) or 0.0 for x in ("import_s", "load_s", "trainer_init_s"))
        if fixed:
            k["fixed"] = max(k.get("fixed", 0.0), fixed + 5.0)
        length, gen, rest = r.get("completion_tokens"), r.get("median_gen_s"), r.get("median_train_s")
        if gen and r.get("generation") == "sample":
            k["lat"] = max(k.get("lat", 0.0), gen / length)
        if rest:
            k["train"] = max(k.get("train", 0.0), rest / (r["group"] * (r["prompt_tokens"] + length)))

    # ------------------------------------------------------------------ runs
    def one(self, variant: str, length: int, *, kind: str, steps: int, warmup: int, generation: str,
            gen_tokens: int, cap_gib: float | None, timeout: float) -> dict:
        """One worker process; returns its record, completed with the failure when it has none."""
        a = self.a
        name = f"grpo-{variant}-{a.model}-L{length}" + (f"-cap{cap_gib:g}" if cap_gib else "")
        rec_path = os.path.abspath(os.path.join(a.out, "specs", name + ".record.json"))
        if os.path.exists(rec_path):
            os.remove(rec_path)
        spec = dict(kind=kind, variant=variant, model=a.model, folder=os.path.abspath(os.path.join(a.ckpt_dir, a.model)),
                    device=a.device, dtype=a.dtype, rank=a.rank, seed=a.seed, lr=a.lr, optim="adamw_torch",
                    warmup=warmup, steps=steps, prompt_tokens=a.prompt_tokens, completion_tokens=length,
                    group=a.group, batch=a.group, generation=generation, gen_tokens=gen_tokens,
                    gen_batch=a.gen_batch, cap_gib=cap_gib, deadline=time.time() + timeout - 5, record=rec_path)
        res = self.spawn(name, spec, V.STACK_OF[variant], timeout, worker=WORKER)
        try:
            with open(rec_path, encoding="utf-8") as fh:
                r = json.load(fh)[0]
        except (OSError, ValueError, IndexError):
            r = {k: spec[k] for k in ("kind", "variant", "model", "completion_tokens", "generation", "cap_gib")}
        r.update(wall_s=res["wall_s"], log=res["log"], timeout=res["timed_out"])
        if "error" not in r and not r.get("done"):
            if "median_step_s" in r:  # trained; killed while timing generate()
                r["generate"] = {"skipped": f"killed after {res['wall_s']}s while timing generate()"}
            else:
                r["error"] = (f"timeout after {res['wall_s']}s, {r.get('steps_done', 0)} step(s) done"
                              if res["timed_out"] else f"exit {res['rc']} before finishing: {res['tail'][-600:]}")
        if "error" not in r:
            self.learn(variant, r)
        return r

    def measure(self, variants: list[str], ready: set) -> None:
        """Every variant at ``--completion-tokens``, each in its own process (``--jobs`` > 1: CPU only)."""
        a = self.a

        def job(v: str) -> dict:
            need = self.estimate(v, a.completion_tokens, a.warmup + a.steps, "sample", a.gen_tokens)
            if a.model not in ready or (self.started and self.remaining() < need):
                why = "checkpoint missing (prepare failed)" if a.model not in ready else \
                    f"skipped: {self.remaining():.0f}s left of the call's budget, ~{need:.0f}s needed"
                return {"kind": "grpo", "variant": v, "model": a.model, "completion_tokens": a.completion_tokens,
                        "error": why, "skipped": True}
            self.started += 1
            return self.one(v, a.completion_tokens, kind="grpo", steps=a.steps, warmup=a.warmup, generation="sample",
                            gen_tokens=a.gen_tokens, cap_gib=None, timeout=min(a.run_timeout, self.remaining()))

        with ThreadPoolExecutor(max(1, a.jobs)) as pool:
            for r in pool.map(job, variants):
                self.add(r)
                self.say(summary(r))

    def maxlen(self, variants: list[str], ready: set) -> None:
        """Longest completion under ``--cap-gib`` per variant (bench/e2e_maxseq.py's search)."""
        a = self.a
        for v in variants:
            probes: list[dict] = []
            if a.model not in ready:
                self.add({"kind": "maxlen", "variant": v, "model": a.model, "error": "checkpoint missing"})
                continue

            def probe(length: int, v=v, probes=probes):
                need = self.estimate(v, length, a.maxlen_steps, a.maxlen_generation, 0)
                if probes and self.remaining() < need:  # a search's first probe always starts
                    self.say(f"maxlen {v} {length}: not started ({self.remaining():.0f}s left, ~{need:.0f}s needed)")
                    return None
                r = self.one(v, length, kind="maxlen_probe", steps=a.maxlen_steps, warmup=0,
                             generation=a.maxlen_generation, gen_tokens=0, cap_gib=a.cap_gib,
                             timeout=min(a.maxlen_timeout, self.remaining()))
                ok = "error" not in r and r.get("steps_done") == a.maxlen_steps
                probes.append({"completion_tokens": length, "ok": ok, **{k: r.get(k) for k in (
                    "peak_gib", "gen_peak_gib", "train_peak_gib", "peak_phase", "reserved_peak_gib", "step_s",
                    "wall_s", "oom", "log", "gpu", "versions")}, "error": (r.get("error") or "")[:300] or None})
                self.say(f"maxlen {v:<18} {length:>6} tokens: {'ok' if ok else 'FAIL'} peak {r.get('peak_gib')} GiB "
                         f"({r.get('peak_phase')}) {'' if ok else (r.get('error') or '')[:120]} (wall {r['wall_s']}s)")
                if ok:
                    return True
                err = (r.get("error") or "").lower()  # only running out of memory says "too long"
                return False if r.get("oom") or "alloc_failed" in err or "out of memory" in err else None

            res = MS.search(probe, a.maxlen_start, a.maxlen_max, a.maxlen_step)
            best = max((p for p in probes if p["ok"]), key=lambda p: p["completion_tokens"], default={})
            rec = {"kind": "maxlen", "variant": v, "model": a.model, "cap_gib": a.cap_gib, "rank": a.rank,
                   "group": a.group, "prompt_tokens": a.prompt_tokens, "steps": a.maxlen_steps,
                   "generation": a.maxlen_generation, "max_completion": res["max_seq"], "first_fail": res["first_fail"],
                   "complete": res["complete"], "resolution": a.maxlen_step, "peak_gib": best.get("peak_gib"),
                   "peak_phase": best.get("peak_phase"), "probes": probes,
                   **{k: next((p[k] for p in probes if p.get(k)), None) for k in ("gpu", "versions")}}
            if res["max_seq"] is None:
                rec["error"] = "no probe passed" if res["complete"] else "search stopped before any pass"
            self.add(rec)
            self.say(f"maxlen {v}: longest {res['max_seq']} (first fail {res['first_fail']}, complete {res['complete']})")


# ---------------------------------------------------------------------------------------------- report

def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def summary(r: dict) -> str:
    head = f"{r['variant']:<18} {r.get('model', ''):<13} L{r.get('completion_tokens')}"
    if "error" in r:
        return f"{head} ERROR {(r['error'] or '-').splitlines()[0][:160]} (wall {r.get('wall_s')}s)"
    g = r.get("generate") or {}
    speed = g.get("patched_tok_s") or g.get("peft_tok_s")
    return (f"{head} after load {r['after_load_gib']:.2f}  peak {r['peak_gib']:.2f} GiB ({r['peak_phase']})  "
            f"step {r['median_step_s']:.2f}s (generation {r['median_gen_s']:.2f}s)  loss {_f(r.get('loss'), '{:.4f}')}  "
            f"generate {_f(speed, '{:,.0f}')} tok/s" + (f" (unpatched {g['unpatched_tok_s']:,.0f})"
                                                        if g.get("unpatched_tok_s") else "")
            + f"  (wall {r.get('wall_s')}s)")


def markdown(records: list[dict]) -> str:
    """Header (GPU, versions, workload, command), the memory table, generate() speeds, longest completions."""
    keys = ("torch", "triton", "transformers", "trl", "peft", "bitsandbytes", "corept")
    ver = REP.package_versions(records, keys)
    env = next((r for r in records if r.get("versions")), {})
    runs = [r for r in records if r.get("kind") == "grpo"]
    done = next((r for r in runs if "error" not in r), {})
    lines = [f"GRPO with TRL's GRPOTrainer (LoRA r {done.get('rank') or env.get('rank', '–')} on the 7 projections) on "
             f"{env.get('gpu') or 'CPU'} — {env.get('date', '')}; "
             + ", ".join(f"{k} {ver[k]}" for k in keys if ver[k]) + ".", ""]
    if done:
        lines += [f"Workload: per step one prompt of {done['prompt_tokens']} tokens, a group of {done['group']} "
                  f"completions of exactly {done['completion_tokens']} tokens (batch {done['batch']}; EOS masked until "
                  f"then), beta 0, {done['dtype']}, {done['warmup']} warm-up + {done['steps']} timed steps. After load = "
                  "allocated after model + adapters + trainer; peak = max allocated over all steps, generation "
                  "(sampling with the KV cache) and training (scoring, loss forward/backward, optimizer) measured "
                  f"apart; × hf = peak / hf's (QLoRA: hf_qlora's) peak, target ≤ {TARGET:.2f}. Seconds: medians "
                  "over the timed steps. Each variant in its own process (bench/grpo_memory.py).", ""]
    lines += [f"Command: `{env.get('command', '')}`"]
    if runs:
        lines += ["", "| variant | model | completion tokens | after load GiB | peak GiB | × hf | peak in "
                  "| generation peak GiB | training peak GiB | step s | generation s | rest s | sampled tok/s "
                  "| reward first → last | loss first → last | grad norm (last) | checkpointing | error |", "|" + "---|" * 18]
    ok = {r["variant"]: r for r in runs if "error" not in r}
    order = {v: i for i, v in enumerate(VARIANTS)}
    runs.sort(key=lambda r: (_quant(r["variant"]), order.get(r["variant"], 99)))
    for r in runs:
        ref = ok.get("hf_qlora" if _quant(r["variant"]) else "hf", {}).get("peak_gib")
        err = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:90]
        rw = r.get("rewards") or [None]
        ratio = r["peak_gib"] / ref if ref and "error" not in r and r.get("peak_gib") else None
        lines.append(
            f"| {r['variant']} | {r.get('model')} | {r.get('completion_tokens')} | {_f(r.get('after_load_gib'))} "
            f"| {_f(r.get('peak_gib'))} | {_f(ratio)} | {r.get('peak_phase') or '–'} "
            f"| {_f(max(r['gen_peak_gib']) if r.get('gen_peak_gib') else None)} "
            f"| {_f(max(r['train_peak_gib']) if r.get('train_peak_gib') else None)} "
            f"| {_f(r.get('median_step_s'))} | {_f(r.get('median_gen_s'))} | {_f(r.get('median_train_s'))} "
            f"| {_f(r.get('sampled_tok_s'), '{:,.0f}')} | {_f(rw[0])} → {_f(rw[-1])} "
            f"| {_f(r.get('loss0'), '{:.4f}')} → {_f(r.get('loss'), '{:.4f}')} "
            f"| {_f((r.get('grad_norms') or [None])[-1], '{:.3g}')} | {r.get('checkpointing_after') or '–'} | {err} |")
    gens = [r for r in runs if (r.get("generate") or {}).get("new_tokens")]
    if gens:
        lines += ["", "generate() speed (greedy, KV cache, eval mode) of the trained model: hf = its peft model; corept "
                  "= patched, then after `corept.unpatch(model)`:", "",
                  "| variant | rows × new tokens (prompt) | generate tok/s | unpatched tok/s | patched / unpatched "
                  "| greedy rows identical |", "|---|---|---|---|---|---|"]
        for r in gens:
            g = r["generate"]
            lines.append(f"| {r['variant']} | {g['batch']} × {g['new_tokens']} ({g['prompt_tokens']}) "
                         f"| {_f(g.get('patched_tok_s') or g.get('peft_tok_s'), '{:,.0f}')} "
                         f"| {_f(g.get('unpatched_tok_s'), '{:,.0f}')} | {_f(g.get('speedup'))} "
                         f"| {_f(g.get('greedy_rows_identical'), '{}')} of {g['batch']} |")
    lens = [r for r in records if r.get("kind") == "maxlen"]
    if lens:
        m = lens[0]
        lines += ["", f"Longest completion (tokens per completion; a group of {m.get('group')} with one "
                  f"{m.get('prompt_tokens')}-token prompt) that trains {m.get('steps')} steps under the memory cap "
                  "(`set_per_process_memory_fraction`); generation `prefill` = random completions fed through "
                  "the model in 256-token chunks with the KV cache in place of sampling (bench/grpo_memory.py):", "",
                  "| variant | model | cap GiB | generation | longest | first fail | complete | peak GiB (in) | probes |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in lens:
            probes = " ".join(f"{p['completion_tokens']}:{'ok' if p['ok'] else 'fail'}" for p in r.get("probes", []))
            lines.append(f"| {r['variant']} | {r['model']} | {r.get('cap_gib')} | {r.get('generation')} "
                         f"| {_f(r.get('max_completion'), '{}')} | {_f(r.get('first_fail'), '{}')} | {r.get('complete')} "
                         f"| {_f(r.get('peak_gib'))} ({r.get('peak_phase') or '–'}) | {probes} |")
    return "\n".join(lines)


def write(records: list[dict], out: str, tag: str) -> tuple[str, str]:
    return REP.write(records, out, tag, prefix="grpomem", render=markdown)


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", help=f"comma list or 'none'; default hf,corept,corept_lean (tiny: hf,corept); "
                                       f"known: {','.join(VARIANTS)}")
    ap.add_argument("--model", help="an e2e model name; default llama-3.1-8b (tiny: tiny-llama)")
    ap.add_argument("--tiny", action="store_true", help="tiny llama, a few tokens, fp32 (the CPU dry run)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--prompt-tokens", type=int, help="tokens of the one prompt per step; default 256 (tiny: 8)")
    ap.add_argument("--completion-tokens", type=int, help="exact length of every completion; default 1024 (tiny: 8)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt = per_device_train_batch_size")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    ap.add_argument("--steps", type=int, default=2, help="timed steps")
    ap.add_argument("--gen-tokens", type=int, help="new tokens of the generate() timing, 0: none; default 256 (tiny: 8)")
    ap.add_argument("--gen-batch", type=int, default=8, help="rows of the generate() timing")
    ap.add_argument("--rank", type=int, default=16, help="LoRA r (alpha = r)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--maxlen", default="", help="variants for the longest-completion search, e.g. corept_qlora_lean")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="memory cap of the longest-completion probes")
    ap.add_argument("--maxlen-start", type=int, default=4096)
    ap.add_argument("--maxlen-max", type=int, help="default: the model's positions minus the prompt, in steps")
    ap.add_argument("--maxlen-step", type=int, default=1024)
    ap.add_argument("--maxlen-steps", type=int, default=2, help="optimizer steps per probe")
    ap.add_argument("--maxlen-generation", choices=["prefill", "sample"], default="prefill",
                    help="probes' completions: prefill stand-in (default) or TRL's real sampling")
    ap.add_argument("--maxlen-timeout", type=float, default=300.0, help="seconds per probe")
    ap.add_argument("--gen-s-per-token", type=float, help="first estimate of sampling's seconds per token (a whole "
                                                           "group; QLoRA twice); default 0.06 (cpu 0.01)")
    ap.add_argument("--train-s-per-ktok", type=float, help="first estimate of a step's rest, seconds per 1000 "
                                                            "trained tokens; default 0.5 (cpu 0.05)")
    ap.add_argument("--import-s", type=float, help="first estimate of a worker's imports + load; default 45 (cpu 10)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", help="results file: grpomem-<date>-<tag>.json; default gpu (cpu: cpu-tiny)")
    ap.add_argument("--ckpt-dir", help="checkpoint cache (shared with bench/e2e.py); default /tmp/corept-e2e-ckpt "
                                       "(tiny: OUT/ckpt)")
    ap.add_argument("--work-dir", help="workers' cwd; default /tmp/corept-e2e-work (tiny: OUT/work)")
    ap.add_argument("--site-base", default="", help="PYTHONPATH of the hf variants (and after corept's)")
    ap.add_argument("--site-corept", default="", help="corept's installed packages (corept variants)")
    ap.set_defaults(site_unsloth="", site_corept_prev="", weights="checkpoint")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--jobs", type=int, help="variants at once: 1 on a GPU (default); cpu default 2")
    ap.add_argument("--run-timeout", type=float, help="seconds per variant; default 540 (cpu 240)")
    ap.add_argument("--prepare-timeout", type=float, default=420.0)
    ap.add_argument("--budget-s", type=float, help="whole call (default 540; cpu 600): what no longer fits is skipped")
    return ap


def parse(argv=None) -> argparse.Namespace:
    """The command line with every unset option filled: GPU defaults, or the dry run's with ``--tiny``."""
    a = build_parser().parse_args(argv)
    cpu = a.device == "cpu"
    d = dict(variants="hf,corept" if a.tiny else "hf,corept,corept_lean",
             model="tiny-llama" if a.tiny else "llama-3.1-8b",
             dtype="fp32" if cpu else "bf16", prompt_tokens=8 if a.tiny else 256,
             completion_tokens=8 if a.tiny else 1024, gen_tokens=8 if a.tiny else 256,
             tag="cpu-tiny" if cpu else "gpu", ckpt_dir=os.path.join(a.out, "ckpt") if a.tiny else "/tmp/corept-e2e-ckpt",
             work_dir=os.path.join(a.out, "work") if a.tiny else "/tmp/corept-e2e-work", jobs=2 if cpu else 1,
             run_timeout=240.0 if cpu else 540.0, budget_s=600.0 if cpu else 540.0,
             gen_s_per_token=0.01 if cpu else 0.06, train_s_per_ktok=0.05 if cpu else 0.5, import_s=10.0 if cpu else 45.0)
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.smoke = cpu  # bench/e2e.py's Driver: one thread per worker, no TRITON_INTERPRET (corept's torch twins)
    if a.maxlen_max is None:
        positions = V.MODELS[a.model]["max_position_embeddings"]
        a.maxlen_max = max(a.maxlen_step, (positions - a.prompt_tokens) // a.maxlen_step * a.maxlen_step)
    return a


def main(argv=None) -> int:
    a = parse(argv)
    variants, maxlen = E2E._names(a.variants, VARIANTS), E2E._names(a.maxlen, VARIANTS)
    E2E._names(a.model, V.MODELS)
    if cpu_quant := [v for v in variants + maxlen if _quant(v) and a.device == "cpu"]:
        raise SystemExit(f"{cpu_quant}: 4-bit variants need CUDA (bitsandbytes)")
    d = GrpoDriver(a)
    d.say(f"grpomem: {variants or '-'} on {a.model}, {a.group} x ({a.prompt_tokens} + {a.completion_tokens}) tokens"
          + (f"; longest completion of {maxlen} under {a.cap_gib} GiB" if maxlen else "")
          + f"; budget {a.budget_s:.0f}s; out {a.out}")
    ready = d.prepare([a.model])
    if variants:
        d.measure(variants, ready)
    if maxlen:
        d.maxlen(maxlen, ready)
    jpath, mpath = write(d.records, a.out, a.tag)
    print(markdown(d.records))
    d.say(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
