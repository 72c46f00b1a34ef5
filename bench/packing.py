"""Packed vs padded SFT on a heavy-tailed length mix: corept, HF + TRL and Unsloth side by side.

    python3 -P bench/packing.py --models llama-3.1-8b --out $OUT --site-base /tmp/site_base \\
        --site-corept /tmp/site_corept --site-unsloth /tmp/site_unsloth      # what the GPU preset runs
    python3 -P bench/packing.py --smoke --out /tmp/packing-smoke     # CPU, tiny Llama (make test runs it)
    python3 -P bench/packing.py --merge a.json b.json --out bench/results   # combine split calls

**Data** (bench/packing_data.py): pre-tokenized random-token documents whose lengths follow a
log-normal clipped to [32, 8192] (median 400, sigma 1.0: about three in four documents between
100 and 1,000 tokens, mean ~650, a tail to 8k), seeded; sized for ``warmup + steps`` optimizer
steps, and every variant trains **one epoch over the same documents** (so each run's real tokens
add up to the dataset's). Labels = input ids (TRL builds them).

**Token budget per optimizer step** (``--tokens-per-step``, default 16,384), the same for all:

* packed: ``SFTConfig(packing=True, packing_strategy="bfd", max_length=16384,
  per_device_train_batch_size=1)``: TRL packs documents best-fit-decreasing into rows of at most
  16,384 tokens and collates them padding-free (``position_ids``; TRL >= 1.16 also
  ``cu_seq_lens_q/k``), one row per step;
* padded: ``packing=False``, ``max_length=16384`` (no document is cut),
  ``per_device_train_batch_size=--padded-batch`` (8) documents per micro-batch, each padded to the
  longest row of its micro-batch, and ``gradient_accumulation_steps = round(16384 / mean length /
  8)``, so a step sees the same real tokens as a packed one on average;
* Unsloth's default: the padded config with ``padding_free`` left unset. Unsloth 2026.10.9
  (``unsloth/trainer.py``, ``unsloth/utils/padding_choice.py``) then decides: unless
  ``UNSLOTH_DISABLE_AUTO_PADDING_FREE`` is set or the model/collator blocks it, it turns
  **padding-free batching** on (the micro-batch's documents concatenated into one row, no
  padding, no BFD packing), except on GPUs it measured (sm75/80/89/120) when a padded micro-batch
  is cheap and the run long enough, where it keeps padded batches; on H100/H200 (sm90, "not
  measured") it always picks padding-free. With a pre-tokenized dataset and ``max_length`` set,
  Unsloth's SFTTrainer cuts the rows to ``max_length`` itself to keep padding-free (none is longer
  here); where it cannot, it turns padding-free off. ``batching_in_use`` and ``pad_fraction`` in
  each record say what ran. ``unsloth_packed`` runs Unsloth with the packed config.

**Stacks**, each run in its own process (bench/packing_worker.py; PYTHONPATH per stack from
``--site-*``; ``--group-stacks``, the smoke's default, gives a stack's runs one process) through the public training API: model + LoRA r16 the way bench/e2e_variants.py
loads each stack (``corept.load`` + ``corept.get_peft_model`` with corept's defaults; HF
``from_pretrained`` + peft + non-reentrant gradient checkpointing; ``FastLanguageModel`` with
Unsloth's checkpointing), then TRL's ``SFTTrainer`` (Unsloth's patched one under Unsloth), bf16,
``adamw_torch``, lr 1e-4. Checkpoints come from the e2e bench's ``prepare`` step (random bf16
weights of the public configs, cached in ``--ckpt-dir``).

**Measures** per run: each optimizer step timed by a callback between two synchronizations; real
(non-pad) tokens, computed positions, label tokens and documents per step counted from the inputs
the trainer's ``training_step`` receives; ``real_tokens_per_s`` = median over the timed steps of
real tokens / step time (``--warmup`` steps excluded); step-time spread (max/min and coefficient
of variation); peak = ``torch.cuda.max_memory_allocated`` during ``train()``; the logged loss of
every step. Results: ``packing-<date>-<tag>.json`` + ``.md`` under ``--out`` (rewritten after every
run), worker logs under ``--out/logs``. This process imports nothing but the standard library.
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
WORKER = os.path.join(HERE, "packing_worker.py")
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path.pop(0)  # bench/kernels.py must never shadow the `kernels` package


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"corept_bench_{name}", os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


E2E, D = _sibling("e2e"), _sibling("packing_data")
V, REP = E2E.V, E2E.REP

VARIANTS = {  # name: (stack variant of bench/e2e_variants.py, batching); default order = importance
    "corept_packed": ("corept", "packed"), "hf_packed": ("hf", "packed"), "unsloth": ("unsloth", "unsloth_default"),
    "corept_padded": ("corept", "padded"), "hf_padded": ("hf", "padded"),
    "corept_qlora_packed": ("corept_qlora", "packed"), "hf_qlora_packed": ("hf_qlora", "packed"),
    "unsloth_qlora": ("unsloth_qlora", "unsloth_default"),
    "corept_qlora_padded": ("corept_qlora", "padded"), "hf_qlora_padded": ("hf_qlora", "padded"),
    "unsloth_packed": ("unsloth", "packed"), "unsloth_qlora_packed": ("unsloth_qlora", "packed"),
    # use_gradient_checkpointing="corept" (offloaded recompute) instead of the default "auto"
    "corept_lean_packed": ("corept_lean", "packed"), "corept_qlora_lean_packed": ("corept_qlora_lean", "packed"),
}
FILL = 0.97
"""The dataset holds ``FILL x (warmup + steps) x tokens per step`` tokens: BFD fills rows to ~99%,
so packed runs end after about ``warmup + steps`` steps (padded ones after about as many)."""


def batch_plan(mean_len: float, tokens_per_step: int, padded_batch: int) -> dict:
    """``{batching: (per_device_train_batch_size, gradient_accumulation_steps)}`` for the budget."""
    accum = max(1, round(tokens_per_step / mean_len / padded_batch))
    return {"packed": (1, 1), "padded": (padded_batch, accum), "unsloth_default": (padded_batch, accum)}


def _mix(a) -> dict:
    return {"median": a.len_median, "sigma": a.len_sigma, "low": a.len_min, "high": a.len_max}


class PackingDriver(E2E.Driver):
    """bench/e2e.py's driver (checkpoint preparation, per-stack PYTHONPATH, subprocesses, budget),
    with this benchmark's runs and results files."""

    def __init__(self, args):
        super().__init__(args)
        self.command = "python3 -P bench/packing.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
        self.target = int(FILL * (args.warmup + args.steps) * args.tokens_per_step)
        self.length_mix = dict(distribution="log-normal clipped to [low, high]", params=_mix(args), seed=args.seed,
                               **D.summary(D.lengths(self.target, args.seed, **_mix(args))))
        self.plan = batch_plan(self.length_mix["mean"], args.tokens_per_step, args.padded_batch)
        self.shape = f"{args.tokens_per_step}/step"

    def add(self, rec: dict) -> None:
        rec.setdefault("command", self.command)
        rec.setdefault("date", time.strftime("%Y-%m-%d"))
        if rec.get("kind") == "packing":
            rec.setdefault("length_mix", self.length_mix)
        self.records.append(rec)
        write(self.records, self.a.out, self.a.tag)

    def run(self, model: str, variants: list[str], ready: set) -> list[dict]:
        """``variants`` (all of one stack) on ``model`` in one worker process, or skipped records
        when they no longer fit the call's budget."""
        a = self.a
        base = []
        for v in variants:
            stack_variant, batching = VARIANTS[v]
            batch, accum = self.plan[batching]
            base.append({"kind": "packing", "variant": v, "model": model, "shape": self.shape, "batching": batching,
                         "stack_variant": stack_variant, "batch": batch, "grad_accum": accum})
        stack = V.STACK_OF[base[0]["stack_variant"]]
        need = min(a.run_timeout, (self.durations.get(stack) or E2E.estimate_s(stack, 1)) * len(variants))
        if model not in ready or self.remaining() < need:
            why = "checkpoint missing (prepare failed)" if model not in ready else \
                f"skipped: {self.remaining():.0f}s left of the call's budget, ~{need:.0f}s needed"
            return [dict(b, error=why, skipped=True) for b in base]
        name = f"packing-{'+'.join(variants)}-{model}"
        rec_path = os.path.abspath(os.path.join(a.out, "specs", name + ".record.json"))
        if os.path.exists(rec_path):
            os.remove(rec_path)
        spec = dict(runs=base, model=model, shape=self.shape,
                    folder=os.path.abspath(os.path.join(a.ckpt_dir, model)), device=a.device, dtype=a.dtype,
                    rank=a.rank, warmup=a.warmup, seed=a.seed, lr=a.lr, tokens_per_step=a.tokens_per_step,
                    max_length=a.tokens_per_step, mix=_mix(a), target_tokens=self.target, record=rec_path)
        res = self.spawn(name, spec, stack, min(a.run_timeout, self.remaining()), worker=WORKER)
        self.durations[stack] = max(self.durations.get(stack, 0.0), res["wall_s"] / len(variants))
        try:
            with open(rec_path, encoding="utf-8") as fh:
                recs = json.load(fh)
        except (OSError, ValueError):
            recs = base
        for r in recs:
            r.update(wall_s=res["wall_s"], log=res["log"])
            if "real_tokens_per_s" in r or "error" in r:
                continue
            if res["timed_out"]:
                r.update(error=f"timeout after {res['wall_s']}s", timeout=True)
            else:
                r["error"] = f"exit {res['rc']} before finishing: {res['tail'][-600:]}"
        return recs

    def runs(self, models: list[str], variants: list[str], ready: set) -> None:
        """Every model x variant in this order, each in its own process (``--group-stacks``: a
        stack's variants share one); ``--jobs N`` > 1 runs N processes at once (CPU smoke only)."""
        plan = []
        for m in models:
            if not self.a.group_stacks:
                plan += [(m, [v]) for v in variants]
                continue
            by_stack: dict[str, list[str]] = {}
            for v in variants:
                by_stack.setdefault(V.STACK_OF[VARIANTS[v][0]], []).append(v)
            plan += [(m, vs) for vs in by_stack.values()]
        with ThreadPoolExecutor(max(1, self.a.jobs)) as pool:
            for recs in pool.map(lambda job: self.run(*job, ready), plan):
                for rec in recs:
                    self.add(rec)
                    self.say(summary(rec))


def summary(r: dict) -> str:
    head = f"{r['variant']:<21} {r['model']:<13}"
    if "error" in r:
        return f"{head} ERROR {(r['error'] or '-').splitlines()[0][:160]} (wall {r.get('wall_s')}s)"
    return (f"{head} {r.get('batching_in_use', ''):<14} {r['real_tokens_per_s']:>9,.0f} real tok/s  median "
            f"{r['median_step_s']:.3f}s  spread {r['spread']:.2f}  pad {100 * r['pad_fraction']:.0f}%  peak "
            f"{r['peak_gib']:.2f} GiB  loss {r['loss0']:.4f} -> {r['loss']:.4f}  (wall {r.get('wall_s')}s)")


# ---------------------------------------------------------------------------------------------- report

def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


PEERS = {"hf_packed": ("hf_packed", "hf_qlora_packed"), "unsloth": ("unsloth", "unsloth_qlora")}
"""The ratio columns' references: (LoRA, QLoRA) variant."""


def markdown(records: list[dict]) -> str:
    """Header (GPU, versions, data, budget, method), the throughput table and the losses per step."""
    rows = [r for r in records if r.get("kind") == "packing"]
    env = next((r for r in rows if r.get("versions")), {})
    keys = ("torch", "triton", "transformers", "trl", "peft", "datasets", "bitsandbytes", "unsloth", "corept")
    ver = REP.package_versions(rows, keys)
    mix = next((r["length_mix"] for r in rows if r.get("length_mix")), None)
    done = next((r for r in rows if "error" not in r), env)
    head = [f"Packed vs padded SFT (LoRA r {done.get('rank', '–')}) on {env.get('gpu') or 'CPU'} — "
            f"{env.get('date', '')}; " + ", ".join(f"{k} {ver[k]}" for k in keys if ver[k]) + ".", ""]
    if mix:
        p = mix["params"]
        head += [f"Documents: {mix['distribution']} (median {p['median']}, sigma {p['sigma']}, [{p['low']}, "
                 f"{p['high']}], seed {mix['seed']}): {mix['docs']} documents, {mix['tokens']:,} tokens; length mean "
                 f"{mix['mean']}, median {mix['median']}, p90 {mix['p90']}, p99 {mix['p99']}, max {mix['max']}; "
                 f"{100 * mix['share_100_to_1000']:.0f}% within 100-1,000 tokens, {100 * mix['share_over_2048']:.1f}% "
                 "over 2,048. Every run trains one epoch over these documents.", ""]
    if done.get("tokens_per_step"):
        head += [f"Budget: {done['tokens_per_step']:,} tokens per optimizer step. packed: TRL `packing=True, "
                 f"packing_strategy=\"bfd\"`, `max_length={done['max_length']}`, one packed row per step; padded: "
                 "documents per micro-batch × accumulation (≈ budget / mean length), rows padded to the longest of "
                 "their micro-batch; unsloth: the padded config under Unsloth's default (`padding_free` unset: "
                 "Unsloth decides; column \"in use\"). Real tok/s: median over the timed steps of non-pad tokens / "
                 f"step time ({done.get('warmup')} warm-up steps excluded); peak = max allocated during `train()`; "
                 "pad % = padding share of the computed positions. Each run in its own process (bench/packing.py).",
                 ""]
    head += [f"Command: `{env.get('command', '')}`", ""]
    lines = ["| variant | model | in use | batch × accum | steps (timed) | real tok/s | × hf packed | × unsloth "
             "| median step s | spread max/min | step CV | pad % | real tokens/step | peak GiB | activation GiB "
             "| loss first → last | error |", "|" + "---|" * 17]
    ok = {(r["variant"], r["model"]): r for r in rows if "error" not in r}
    order = list(VARIANTS)
    rows.sort(key=lambda r: (str(r.get("model")), "_qlora" in r["variant"],
                             order.index(r["variant"]) if r["variant"] in order else len(order)))
    for r in rows:
        tps = r.get("real_tokens_per_s") if "error" not in r else None
        ref = {n: ok.get((pair["_qlora" in r["variant"]], r["model"]), {}).get("real_tokens_per_s")
               for n, pair in PEERS.items()}
        err = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:80]
        steps = f"{r['steps_done']} ({r['timed_steps']})" if "timed_steps" in r else _f(r.get("steps_done"), "{}")
        lines.append(
            f"| {r['variant']} | {r['model']} | {r.get('batching_in_use', '–')} | {r.get('batch')} × {r.get('grad_accum')} "
            f"| {steps} | {_f(tps, '{:,.0f}')} | {_f(tps / ref['hf_packed'] if tps and ref['hf_packed'] else None)} "
            f"| {_f(tps / ref['unsloth'] if tps and ref['unsloth'] else None)} | {_f(r.get('median_step_s'), '{:.3f}')} "
            f"| {_f(r.get('spread'))} | {_f(r.get('step_cv'), '{:.3f}')} "
            f"| {_f(None if r.get('pad_fraction') is None else 100 * r['pad_fraction'], '{:.0f}')} "
            f"| {_f(r.get('median_real_tokens_per_step'), '{:,.0f}')} | {_f(r.get('peak_gib'))} "
            f"| {_f(r.get('activation_gib'))} | {_f(r.get('loss0'), '{:.4f}')} → {_f(r.get('loss'), '{:.4f}')} | {err} |")
    losses = ["", "Loss per optimizer step (TRL's logged loss; packed runs see the same rows in the same order, and "
              "so do the padded runs):", "", "| variant | model | losses |", "|---|---|---|"]
    losses += [f"| {r['variant']} | {r['model']} | {' '.join(f'{x:.4f}' for x in r['losses'])} |"
               for r in rows if r.get("losses")]
    return "\n".join(head + lines + losses)


def write(records: list[dict], out: str, tag: str) -> tuple[str, str]:
    return REP.write(records, out, tag, prefix="packing", render=markdown)


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="default llama-3.1-8b (smoke: tiny-llama)")
    ap.add_argument("--variants", help=f"comma list, run in this order; default all: {','.join(VARIANTS)} "
                                       "(smoke: corept_packed,hf_packed,corept_padded,hf_padded)")
    ap.add_argument("--steps", type=int, help="timed steps the data is sized for; default 8 (smoke: 3)")
    ap.add_argument("--warmup", type=int, help="untimed first steps; default 2 (smoke: 1)")
    ap.add_argument("--tokens-per-step", type=int, help="token budget per optimizer step = packed max_length; "
                                                         "default 16384 (smoke: 512)")
    ap.add_argument("--padded-batch", type=int, help="documents per padded micro-batch; default 8 (smoke: 4)")
    ap.add_argument("--len-median", type=float, help=f"default {D.GPU_MIX['median']} (smoke {D.SMOKE_MIX['median']})")
    ap.add_argument("--len-sigma", type=float, help=f"default {D.GPU_MIX['sigma']}")
    ap.add_argument("--len-min", type=int, help=f"default {D.GPU_MIX['low']} (smoke {D.SMOKE_MIX['low']})")
    ap.add_argument("--len-max", type=int, help=f"default {D.GPU_MIX['high']} (smoke {D.SMOKE_MIX['high']})")
    ap.add_argument("--rank", type=int, default=16, help="LoRA r (alpha = r)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", help="results file: packing-<date>-<tag>.json; default gpu (smoke: cpu-smoke)")
    ap.add_argument("--ckpt-dir", help="checkpoint cache (shared with bench/e2e.py); default /tmp/corept-e2e-ckpt")
    ap.add_argument("--work-dir", help="workers' cwd (unsloth's compile cache); default /tmp/corept-e2e-work")
    ap.add_argument("--site-base", default="", help="PYTHONPATH of the hf variants (and after corept's)")
    ap.add_argument("--site-corept", default="", help="corept's installed packages (corept variants)")
    ap.add_argument("--site-unsloth", default="", help="PYTHONPATH of the unsloth variants")
    ap.set_defaults(site_corept_prev="")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default cuda (smoke: cpu)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 (smoke: fp32)")
    ap.add_argument("--jobs", type=int, help="processes at once: 1 on a GPU (default); smoke default 2")
    ap.add_argument("--group-stacks", action=argparse.BooleanOptionalAction, default=None,
                    help="a stack's variants in one process (smoke default; on a GPU each run has its own)")
    ap.add_argument("--run-timeout", type=float, help="seconds per run; default 300")
    ap.add_argument("--prepare-timeout", type=float, default=420.0)
    ap.add_argument("--budget-s", type=float, help="whole call (default 540): runs that no longer fit are skipped")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny Llama, corept and hf packed/padded, fp32")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, the data and the PYTHONPATHs, run nothing")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge results files into --out/packing-<date>-<tag>.*")
    return ap


def parse(argv=None) -> argparse.Namespace:
    """The command line with every unset option filled: GPU defaults, or the smoke's with ``--smoke``."""
    a = build_parser().parse_args(argv)
    mix = D.SMOKE_MIX if a.smoke else D.GPU_MIX
    full = dict(models="llama-3.1-8b", variants=",".join(VARIANTS), steps=8, warmup=2, tokens_per_step=16384,
                padded_batch=8, len_median=mix["median"], len_sigma=mix["sigma"], len_min=mix["low"],
                len_max=mix["high"], device="cuda", dtype="bf16", tag="gpu", ckpt_dir="/tmp/corept-e2e-ckpt",
                work_dir="/tmp/corept-e2e-work", run_timeout=300.0, budget_s=540.0, jobs=1, group_stacks=False)
    smoke = dict(full, models="tiny-llama", variants="corept_packed,hf_packed,corept_padded,hf_padded", steps=3,
                 warmup=1, tokens_per_step=512, padded_batch=4, device="cpu", dtype="fp32", tag="cpu-smoke",
                 ckpt_dir=os.path.join(a.out, "ckpt"), work_dir=os.path.join(a.out, "work"), run_timeout=180.0,
                 budget_s=600.0, jobs=2, group_stacks=True)
    for k, v in (smoke if a.smoke else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.merge:
        print("wrote", *write(REP.merge(a.merge), a.out, a.tag))
        return 0
    models, variants = E2E._names(a.models, V.MODELS), E2E._names(a.variants, VARIANTS)
    if a.len_max > a.tokens_per_step:
        raise SystemExit(f"--len-max {a.len_max} exceeds --tokens-per-step {a.tokens_per_step}: documents would be cut")
    d = PackingDriver(a)
    if a.dry_run:
        for st in ("base", "corept", "unsloth"):
            print(f"{st:8} PYTHONPATH={d.env(st).get('PYTHONPATH', '(inherited: none)')}")
        print(f"models {models} x variants {variants}; budget {a.budget_s}s\nlength mix {d.length_mix}\n"
              f"(batch, accumulation): {d.plan}")
        return 0
    d.say(f"packing: {len(models)} model(s) x {len(variants)} variant(s); {a.tokens_per_step} tokens/step; "
          f"{d.length_mix['docs']} documents, {d.length_mix['tokens']} tokens; budget {a.budget_s:.0f}s; out {a.out}")
    ready = d.prepare(models)
    d.runs(models, variants, ready)
    jpath, mpath = write(d.records, a.out, a.tag)
    print(markdown(d.records))
    d.say(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
