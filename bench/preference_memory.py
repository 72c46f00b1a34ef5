"""DPO/KTO memory benchmark: TRL's DPOTrainer/KTOTrainer on plain HF + peft vs corept, side by side.

    bash bench/run_prefmem_h200.sh                         # the H200 call (installs wheels, <= 3 min)
    python3 -P bench/preference_memory.py --out $OUT --site-base /tmp/site_pref \\
        --site-corept /tmp/site_corept --budget-s 160      # what that script runs
    python3 -P bench/preference_memory.py --device cpu --tiny --out /tmp/prefmem   # CPU dry run

Variants (each in its own subprocess, bench/preference_memory_worker.py):
  hf         transformers + peft the way TRL documents it: the model and a ``LoraConfig`` go to the
             trainer (TRL wraps it; reference = adapter disabled), TRL's gradient checkpointing;
             TRL's fused log-prob head (``add_fused_lm_head``) for policy and reference.
  corept     ``corept.get_peft_model`` on a corept-patched model (``corept.load`` with
             ``--weights checkpoint``; with ``config`` the same seeded weights are built on the device
             and ``corept.patch`` applies what ``corept.load`` would), corept's checkpointing, TRL's
             fused head composed with corept's patched backbone; TRL's "ref" adapter copy deleted
             (reference = adapter disabled), as ``corept.training`` does.
  hf_logits  ``hf`` with TRL's fused head swapped for full-vocabulary logits + fp32 log-softmax: the
             log-prob path TRL had before its fused head, emulated to show what the fused head saves.

Runs per variant: DPO (``--dpo-pairs`` pairs per step, chosen+rejected in one forward) and KTO
(``--kto-rows`` unpaired rows, plus TRL's KL forwards) at each ``--lengths`` value (prompt +
completion tokens per row), ``--warmup`` + ``--steps`` optimizer steps of ``trainer.train()``.
Memory: ``after_load`` = allocated after model + adapters + trainer construction; ``peak`` = max
allocated over the steps; activation = peak - after load (activations, gradients, optimizer
states, log-prob workspaces). Results: ``prefmem-<date>-<tag>.json`` and ``.md`` under ``--out``,
rewritten after every variant; worker logs and per-variant record files under ``--out/logs``.
Standard library only in this process.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "preference_memory_worker.py")
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path.pop(0)  # bench/kernels.py must never shadow the `kernels` package

VARIANTS = ("hf", "corept", "hf_logits")
STACK = {"hf": "base", "hf_logits": "base", "corept": "corept"}


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"corept_bench_{name}", os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _fmt(v, f="{:.2f}") -> str:
    return "–" if v is None else f.format(v)


def markdown(doc: dict) -> str:
    recs = doc["records"]
    v = doc.get("versions") or {}
    lines = [f"DPO/KTO training steps with TRL on {doc.get('gpu') or doc.get('device')} (torch {v.get('torch')}, "
             f"transformers {v.get('transformers')}, trl {v.get('trl')}, peft {v.get('peft')}, corept "
             f"{v.get('corept') or '–'}), {doc['date']}; model {doc['model']} ({doc['dtype']}), "
             f"LoRA r {doc['rank']} on "
             f"the 7 projections, gradient checkpointing, {doc['warmup']} warm-up + {doc['steps']} timed steps.",
             f"Command: `{doc['command']}`", "",
             "| method | tokens/row | batch | variant | log-prob head | median step s | policy tok/s | after load GiB "
             "| peak GiB | activation GiB | act. / hf | checkpointing after | loss first → last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    hf = {(r["method"], r["length"]): r for r in recs if r.get("variant") == "hf" and "error" not in r}
    notes = []
    order = {m: i for i, m in enumerate(VARIANTS)}
    for r in sorted(recs, key=lambda r: (r["method"], r["length"], order.get(r["variant"], 9))):
        batch = f"{r.get('batch')} pairs" if r["method"] == "dpo" else f"{r.get('batch')} rows"
        head = f"| {r['method']} | {r['length']} | {batch} | {r['variant']} |"
        if "error" in r:
            lines.append(head + " " + " | ".join(["–"] * 9) + " |")
            seen = f" (peak so far {r['peak_gib']:.2f} GiB, after load {r.get('after_load_gib')})" \
                if r.get("peak_gib") is not None else ""
            notes.append(f"- {r['method']} {r['length']} {r['variant']}: {r['error'].splitlines()[0][:200]}{seen}")
            continue
        base = hf.get((r["method"], r["length"]))
        ratio = _fmt(r["activation_gib"] / base["activation_gib"]) if base and base["activation_gib"] else "–"
        lines.append(head + f" {r.get('logprob_head')} | {_fmt(r['median_step_s'], '{:.3f}')} | "
                     f"{_fmt(r['tokens_per_s'], '{:,.0f}')} | {_fmt(r['after_load_gib'])} | {_fmt(r['peak_gib'])} | "
                     f"{_fmt(r['activation_gib'])} | {ratio} | {r.get('checkpointing_after')} | "
                     f"{_fmt(r.get('loss0'), '{:.4f}')} → {_fmt(r.get('loss'), '{:.4f}')} |")
    if notes:
        lines += ["", "Not measured:", *notes]
    return "\n".join(lines)


class Driver:
    def __init__(self, a):
        self.a, self.t0 = a, time.monotonic()
        self.deadline = time.time() + a.budget_s
        self.records: list[dict] = []
        self.per_2048: list[float] = []  # measured seconds of a variant's runs, per 2048 tokens and 2 methods
        self.prep_s: list[float] = []  # measured import + data preparation of a worker
        self.command = "python3 -P bench/preference_memory.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
        os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.0f}s] {text}", flush=True)

    def left(self) -> float:
        return self.deadline - time.time()

    def env(self, stack: str) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        if self.a.device == "cpu":  # one thread: torch's intra-op threads stall on a shared 2-core machine
            env.setdefault("OMP_NUM_THREADS", "1")
            env.setdefault("MKL_NUM_THREADS", "1")
        if not self.a.interpret:
            env.pop("TRITON_INTERPRET", None)  # corept runs its torch twins on CPU
        sites = {"base": [self.a.site_base], "corept": [self.a.site_corept, self.a.site_base]}[stack]
        sites = [s for s in sites if s] or [s for s in env.get("PYTHONPATH", "").split(os.pathsep) if s]
        if sites:  # absolute: workers run in --work-dir
            env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(s) for s in sites)
        return env

    def estimate(self, unit: dict) -> float:
        """Seconds ``unit`` should take from its ``go``: its runs, plus what is left of its imports."""
        scale = max(unit["length"] / 2048, 0.05) * len(self.a.methods) / 2
        runs = (max(self.per_2048) if self.per_2048 else self.a.unit_s) * scale
        prep = max(self.prep_s) if self.prep_s else self.a.import_s
        if "proc" in unit:  # spawned ahead: it has been importing since then
            prep -= time.monotonic() - unit["t_spawn"]
        return runs + max(0.0, prep)

    # ------------------------------------------------------------------ one variant = one subprocess
    def spawn(self, unit: dict) -> None:
        a, name = self.a, f"{unit['variant']}-L{unit['length']}"
        spec = {"variant": unit["variant"], "model": a.model, "runs": [[m, unit["length"]] for m in a.methods],
                "device": a.device, "dtype": a.dtype, "rank": a.rank, "seed": a.seed, "lr": a.lr, "optim": a.optim,
                "warmup": a.warmup, "steps": a.steps, "batch": {"dpo": a.dpo_pairs, "kto": a.kto_rows},
                "max_len": max(a.lengths), "folder": a.folder, "gate": True, "deadline": self.deadline - 3,
                "min_run_s": a.min_run_s,
                "record": os.path.abspath(os.path.join(a.out, "logs", name + ".records.json"))}
        spec_path = os.path.join(a.out, "logs", name + ".spec.json")
        with open(spec_path, "w", encoding="utf-8") as fh:
            json.dump(spec, fh, indent=1)
        log = open(os.path.join(a.out, "logs", name + ".log"), "w", encoding="utf-8")  # noqa: SIM115
        env = self.env(STACK[unit["variant"]])
        log.write(f"# PYTHONPATH={env.get('PYTHONPATH', '')}\n")
        log.flush()
        unit.update(spec=spec, log=log, name=name, t_spawn=time.monotonic(), proc=subprocess.Popen(
            [a.python, "-P", WORKER, os.path.abspath(spec_path)], stdin=subprocess.PIPE, stdout=log,
            stderr=subprocess.STDOUT, env=env, cwd=a.work_dir, start_new_session=True, text=True))

    def release(self, unit: dict, word: str) -> None:
        try:
            unit["proc"].stdin.write(word + "\n")
            unit["proc"].stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def finish(self, unit: dict, timeout: float) -> list[dict]:
        """Wait for the worker (killing it at ``timeout``); returns its records, completed."""
        proc, timed_out = unit["proc"], False
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group only
            proc.wait()
        unit["log"].close()
        logrel = os.path.relpath(unit["log"].name, self.a.out)
        try:
            with open(unit["spec"]["record"], encoding="utf-8") as fh:
                recs = json.load(fh)
        except (OSError, ValueError):
            recs = [{"kind": "prefmem", "variant": unit["variant"], "method": m, "length": n,
                     "batch": unit["spec"]["batch"][m]} for m, n in unit["spec"]["runs"]]
        with open(unit["log"].name, encoding="utf-8", errors="replace") as fh:
            tail = fh.read()[-800:]
        for r in recs:
            r.update(log=logrel, command=self.command, wall_s=round(time.monotonic() - unit["t_spawn"], 1))
            if "median_step_s" not in r and "error" not in r:
                r["error"] = (f"killed at the budget's end after {r.get('steps_done', 0)} step(s)" if timed_out
                              else f"exit {proc.returncode} before finishing: {tail}")
        return recs

    def skip(self, unit: dict, why: str) -> None:
        if "proc" in unit:  # spawned ahead: it has only imported (no GPU work yet); end it now
            os.killpg(unit["proc"].pid, signal.SIGKILL)
            unit["proc"].wait()
            unit["log"].close()
        self.records.extend({"kind": "prefmem", "variant": unit["variant"], "method": m, "length": unit["length"],
                             "batch": self.a.dpo_pairs if m == "dpo" else self.a.kto_rows, "error": why,
                             "skipped": True} for m in self.a.methods)

    def run(self) -> dict:
        a = self.a
        units = [{"variant": v, "length": n} for n in a.lengths for v in a.variants]
        for i, unit in enumerate(units):
            first_of_length = i == 0 or units[i - 1]["length"] != unit["length"]
            need = self.estimate(unit)  # a new length starts only if its first two variants fit (a pair to compare)
            if first_of_length and i + 1 < len(units) and units[i + 1]["length"] == unit["length"]:
                need += self.estimate(units[i + 1]) - (max(self.prep_s) if self.prep_s else a.import_s)
            if i > 0 and self.left() < need:  # the first one always starts: nothing is measured yet
                self.skip(unit, f"skipped: {self.left():.0f}s left of the budget, ~{need:.0f}s needed")
                self.say(f"{unit['variant']} L{unit['length']}: skipped ({self.left():.0f}s left, ~{need:.0f}s needed)")
                self.write()
                continue
            if "proc" not in unit:
                self.spawn(unit)
            self.release(unit, "go")
            self.say(f"{unit['variant']} L{unit['length']}: started ({a.methods})")
            if a.overlap and i + 1 < len(units):
                self.spawn(units[i + 1])  # imports and data preparation only, until its "go"
            recs = self.finish(unit, self.left())
            self.records.extend(recs)
            if all("run_wall_s" in r for r in recs):  # calibrate the estimates
                self.per_2048.append(sum(r["run_wall_s"] for r in recs) / (len(recs) / 2)
                                     / max(unit["length"] / 2048, 0.05))
            self.prep_s += [r["prep_s"] for r in recs[:1] if r.get("prep_s")]
            for r in recs:
                self.say(self.summary(r))
            self.write()
        return self.write()

    def summary(self, r: dict) -> str:
        head = f"{r['variant']:<10} {r['method']} L{r['length']:<5}"
        if "error" in r:
            return f"{head} ERROR {r['error'].splitlines()[0][:200]}"
        return (f"{head} median {r['median_step_s']:.3f}s  after load {r['after_load_gib']:.2f}  peak "
                f"{r['peak_gib']:.2f}  act {r['activation_gib']:.2f} GiB  loss {_fmt(r['loss0'], '{:.4f}')} -> "
                f"{_fmt(r['loss'], '{:.4f}')}  "
                f"ckpt {r.get('checkpointing_after')}  (wall {r.get('wall_s')}s)")

    def write(self) -> dict:
        a = self.a
        first = next((r for r in self.records if r.get("versions")), {})
        versions = dict(first.get("versions") or {})
        for r in self.records:  # corept's version comes from a corept record (hf runs without it)
            versions.update({k: v for k, v in (r.get("versions") or {}).items() if versions.get(k) is None})
        doc = {"benchmark": "prefmem", "date": datetime.date.today().isoformat(), "command": self.command,
               "gpu": first.get("gpu"), "device": a.device, "versions": versions or None, "model": a.model,
               "dtype": a.dtype, "rank": a.rank, "warmup": a.warmup, "steps": a.steps, "budget_s": a.budget_s,
               "elapsed_s": round(time.monotonic() - self.t0, 1), "records": self.records}
        stem = os.path.join(a.out, f"prefmem-{doc['date']}-{a.tag}")
        for path, text in ((stem + ".json", json.dumps(doc, indent=1, default=str)), (stem + ".md", markdown(doc))):
            with open(path + ".tmp", "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
            os.replace(path + ".tmp", path)
        doc["paths"] = (stem + ".json", stem + ".md")
        return doc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of hf, corept, hf_logits")
    ap.add_argument("--methods", default="dpo,kto")
    ap.add_argument("--lengths", help="tokens per row (prompt + completion), comma list; default 2048,4096 (tiny: 64)")
    ap.add_argument("--dpo-pairs", type=int, default=2, help="preference pairs per DPO step")
    ap.add_argument("--kto-rows", type=int, default=4, help="unpaired rows per KTO step (>= 2)")
    ap.add_argument("--warmup", type=int, help="untimed first steps; default 2 (tiny: 1)")
    ap.add_argument("--steps", type=int, help="timed steps; default 3 (tiny: 2)")
    ap.add_argument("--model", help="an e2e model name; default llama-3.1-8b (tiny: tiny-llama)")
    ap.add_argument("--tiny", action="store_true", help="tiny llama config, short rows, few steps (the dry run)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--weights", choices=["config", "checkpoint"],
                    help="config: build seeded weights on the device in each run (default on cuda); checkpoint: "
                         "save them once to --ckpt-dir, hf loads with from_pretrained and corept with corept.load "
                         "(default with --tiny)")
    ap.add_argument("--ckpt-dir", help="default /tmp/corept-e2e-ckpt (shared with bench/e2e.py); tiny: OUT/ckpt")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--optim", default="adamw_torch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", help="default h200 (cpu: cpu-tiny)")
    ap.add_argument("--budget-s", type=float,
                    help="the whole call; default 165 (cpu: 1800); what no longer fits is skipped")
    ap.add_argument("--unit-s", type=float, help="first estimate of one variant's dpo+kto at 2048 tokens (default 35)")
    ap.add_argument("--import-s", type=float, help="first estimate of a worker's imports (default 30; cpu 8)")
    ap.add_argument("--min-run-s", type=float, help="a worker skips a run with less time left (per 2048 tokens)")
    ap.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                    help="let the next variant import while one trains (default: on for cuda, off for cpu)")
    ap.add_argument("--interpret", action=argparse.BooleanOptionalAction, default=True,
                    help="keep TRITON_INTERPRET for the workers if set (--no-interpret: corept's torch twins on CPU)")
    ap.add_argument("--site-base", default="", help="PYTHONPATH of hf/hf_logits (trl, datasets, ...)")
    ap.add_argument("--site-corept", default="", help="corept's packages (put before --site-base for corept)")
    ap.add_argument("--work-dir", default=None, help="workers' cwd; default OUT/work")
    ap.add_argument("--python", default=sys.executable)
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    cpu = a.device == "cpu"
    defaults = dict(lengths="64" if a.tiny else "2048,4096", warmup=1 if a.tiny else 2, steps=2 if a.tiny else 3,
                    model="tiny-llama" if a.tiny else "llama-3.1-8b", dtype="fp32" if cpu else "bf16",
                    weights="checkpoint" if a.tiny else "config", tag="cpu-tiny" if cpu else "h200",
                    budget_s=1800.0 if cpu else 165.0, unit_s=35.0, import_s=8.0 if cpu else 30.0,
                    min_run_s=1.0 if a.tiny else 12.0,
                    overlap=not cpu, ckpt_dir=os.path.join(a.out, "ckpt") if a.tiny else "/tmp/corept-e2e-ckpt",
                    work_dir=os.path.join(a.out, "work"))
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.variants = [v for v in a.variants.split(",") if v]
    a.methods = [m for m in a.methods.split(",") if m]
    a.lengths = [int(n) for n in str(a.lengths).split(",") if n]
    bad = [v for v in a.variants if v not in VARIANTS] + [m for m in a.methods if m not in ("dpo", "kto")]
    if bad or a.kto_rows < 2:
        raise SystemExit(f"unknown variant/method {bad} (variants {VARIANTS}, methods dpo,kto) or --kto-rows < 2")
    os.makedirs(a.work_dir, exist_ok=True)
    d = Driver(a)
    a.folder = None
    if a.weights == "checkpoint":
        ev = _sibling("e2e_variants")
        a.folder = os.path.abspath(os.path.join(a.ckpt_dir, a.model))
        if not ev.is_prepared(a.folder, a.model, a.seed, a.dtype):
            d.say(f"saving the {a.model} checkpoint to {a.folder}")
            spec = os.path.join(a.out, "logs", "prepare.spec.json")
            with open(spec, "w", encoding="utf-8") as fh:
                json.dump({"mode": "prepare", "models": [a.model], "ckpt_dir": os.path.abspath(a.ckpt_dir),
                           "seed": a.seed, "device": a.device, "dtype": a.dtype}, fh)
            rc = subprocess.run([a.python, "-P", os.path.join(HERE, "e2e_worker.py"), os.path.abspath(spec)],
                                env=d.env("base"), timeout=max(10.0, d.left()), cwd=a.work_dir).returncode
            if rc != 0 or not ev.is_prepared(a.folder, a.model, a.seed, a.dtype):
                raise SystemExit(f"saving the checkpoint failed (exit {rc}); see the traceback above")
    d.say(f"prefmem: {a.variants} x {a.methods} x lengths {a.lengths} on {a.device}; budget {a.budget_s:.0f}s")
    doc = d.run()
    print(markdown(doc))
    d.say(f"wrote {doc['paths'][0]} and {doc['paths'][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
