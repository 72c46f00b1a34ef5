"""End-to-end LoRA/QLoRA fine-tuning benchmark: HF + peft, Liger, Unsloth and corept side by side.

    python3 bench/e2e.py --models llama-3.1-8b,qwen3-8b --shapes 2x2048,1x8192 \\
        --variants hf,hf_bf16,liger,unsloth,corept,hf_qlora,unsloth_qlora,corept_qlora \\
        --steps 8 --warmup 2 --out $OUT --site-base /tmp/site_base --site-corept /tmp/site_corept \\
        --site-unsloth /tmp/site_unsloth
    python3 bench/e2e.py --variants none --maxseq hf_qlora,corept_qlora --out $OUT ...   # longest sequence
    python3 bench/e2e.py --smoke --out /tmp/e2e-smoke        # CPU, tiny models (make test runs it)
    python3 bench/e2e.py --merge a.json b.json --out bench/results   # combine split calls
    python3 bench/e2e.py --link-site /tmp/site_corept          # install corept's packages, no build

First a ``prepare`` step saves each model's seeded random checkpoint + tokenizer once (cached in
``--ckpt-dir``); then every variant x model x shape runs in its own subprocess
(bench/e2e_worker.py: fresh CUDA context, its own PYTHONPATH from --site-*), bounded by a timeout
and by the call's ``--budget-s`` (runs that no longer fit are recorded as skipped). Results are
rewritten after every record: ``e2e-<date>-<tag>.json`` + ``.md`` under --out, worker logs under
``--out/logs``. This process imports nothing but the standard library. Method:
docs/benchmarks-e2e-method.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "e2e_worker.py")
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path.pop(0)  # bench/kernels.py must never shadow the `kernels` package


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"corept_bench_{name}", os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


V, MS, REP = _sibling("e2e_variants"), _sibling("e2e_maxseq"), _sibling("e2e_report")
EST_S = {"base": (20.0, 20.0), "corept": (30.0, 20.0), "corept_prev": (30.0, 20.0), "unsloth": (40.0, 50.0)}
"""First-run estimate of one worker process per stack, seconds: (import + load, per shape); Unsloth
compiles per shape. Measured on the H200 (2026-11-29): base 30 s for one shape and 43-51 s for two,
corept 45 / 49-71, Unsloth 75-80 / 92-123. A flat 150 s per shape skipped an Unsloth run that
needed ~125 s for both shapes with 220 s left."""


def estimate_s(stack: str, n_shapes: int) -> float:
    fixed, per_shape = EST_S[stack]
    return fixed + per_shape * n_shapes


def parse_shapes(text: str) -> list[list[int]]:
    return [[int(x) for x in s.lower().split("x")] for s in text.split(",") if s.strip()]


def _names(text: str, known) -> list[str]:
    names = [] if text.strip().lower() in ("", "none") else [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"unknown name(s) {bad}; known: {list(known)}")
    return names


class Driver:
    """Runs the plan of one call and keeps the results files current."""

    def __init__(self, args):
        self.a, self.t0, self.records, self.durations = args, time.monotonic(), [], {}
        self.command = "python3 bench/e2e.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
        for d in ("logs", "specs"):
            os.makedirs(os.path.join(args.out, d), exist_ok=True)
        os.makedirs(args.work_dir, exist_ok=True)

    # ------------------------------------------------------------------ plumbing
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.a.budget_s - self.elapsed()

    def env(self, stack: str) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   PYTHONUNBUFFERED="1", UNSLOTH_DISABLE_STATISTICS="1", TOKENIZERS_PARALLELISM="false")
        if self.a.smoke:
            env.pop("TRITON_INTERPRET", None)  # corept runs its torch twins on CPU
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # --jobs processes share the cores
        sites = {"base": [self.a.site_base], "corept": [self.a.site_corept, self.a.site_base],
                 "corept_prev": [self.a.site_corept_prev, self.a.site_base], "unsloth": [self.a.site_unsloth]}[stack]
        sites = [s for s in sites if s] or [s for s in env.get("PYTHONPATH", "").split(os.pathsep) if s]
        if sites:  # absolute: workers run in --work-dir
            env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(s) for s in sites)
        return env

    def spawn(self, name: str, spec: dict, stack: str, timeout: float, worker: str = WORKER) -> dict:
        """Run ``worker`` (default bench/e2e_worker.py) on ``spec``; returns rc, timed_out, wall_s, log
        path and the log's tail."""
        spec_path = os.path.join(self.a.out, "specs", name + ".json")
        log_path = os.path.join(self.a.out, "logs", name + ".log")
        with open(spec_path, "w", encoding="utf-8") as fh:
            json.dump(spec, fh, indent=1)
        cmd = [self.a.python, "-P", worker, os.path.abspath(spec_path)]
        t = time.monotonic()
        timed_out = False
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(f"# {' '.join(cmd)}\n# PYTHONPATH={self.env(stack).get('PYTHONPATH', '')}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(stack),
                                    cwd=self.a.work_dir, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group only
                rc = proc.wait()
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            tail = fh.read()[-1500:]
        return {"rc": rc, "timed_out": timed_out, "wall_s": round(time.monotonic() - t, 1),
                "log": os.path.relpath(log_path, self.a.out), "tail": tail}

    def add(self, rec: dict) -> None:
        rec.setdefault("command", self.command)
        rec.setdefault("date", time.strftime("%Y-%m-%d"))
        self.records.append(rec)
        REP.write(self.records, self.a.out, self.a.tag)

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.0f}s] {text}", flush=True)

    # ------------------------------------------------------------------ steps
    def prepare(self, models: list[str]) -> set[str]:
        """Save missing checkpoints in one subprocess; returns the models that are ready."""
        folder = lambda m: os.path.join(self.a.ckpt_dir, m)  # noqa: E731
        ready = lambda m: V.is_prepared(folder(m), m, self.a.seed, self.a.dtype)  # noqa: E731
        todo = [m for m in models if not ready(m)]
        if todo:
            self.make_room(todo, keep=models)
            self.say(f"prepare: saving {', '.join(todo)} to {self.a.ckpt_dir}")
            spec = {"mode": "prepare", "models": todo, "ckpt_dir": os.path.abspath(self.a.ckpt_dir),
                    "seed": self.a.seed, "device": self.a.device, "dtype": self.a.dtype}
            res = self.spawn("prepare", spec, "base", min(self.a.prepare_timeout, self.remaining()))
            rec = {"kind": "prepare", "models": todo, "wall_s": res["wall_s"], "log": res["log"]}
            if res["rc"] != 0 or res["timed_out"] or not all(ready(m) for m in todo):
                rec["error"] = ("timeout" if res["timed_out"] else f"exit {res['rc']}") + ": " + res["tail"][-600:]
                self.say(f"prepare FAILED ({rec['error'][:200]})")
            else:
                self.say(f"prepare done in {res['wall_s']}s")
            self.add(rec)
        return {m for m in models if ready(m)}

    def make_room(self, todo: list[str], keep: list[str]) -> None:
        """Delete other cached checkpoints of ours when the disk cannot hold the ones to save."""
        os.makedirs(self.a.ckpt_dir, exist_ok=True)
        need = 1.1 * sum(V.approx_bytes(m, self.a.dtype) for m in todo)
        free = shutil.disk_usage(self.a.ckpt_dir).free
        for old in sorted(os.listdir(self.a.ckpt_dir)):
            path = os.path.join(self.a.ckpt_dir, old)
            if free >= need:
                break
            if old not in keep and os.path.isfile(os.path.join(path, V.MARKER)):
                shutil.rmtree(path, ignore_errors=True)
                free = shutil.disk_usage(self.a.ckpt_dir).free
                self.say(f"prepare: removed cached checkpoint {old} to make room")
        if free < need:
            self.say(f"prepare: WARNING only {free / 2**30:.1f} GiB free for ~{need / 2**30:.1f} GiB of checkpoints")

    def train(self, name: str, variant: str, model: str, shapes: list, *, kind="throughput", steps=None,
              warmup=None, rank=None, cap_gib=None, timeout=None) -> list[dict]:
        """One worker run (one or more shapes); returns its records, errors included."""
        stack = V.STACK_OF[variant]
        rec_path = os.path.abspath(os.path.join(self.a.out, "specs", name + ".record.json"))
        rank = rank or self.a.rank
        spec = {"mode": "train", "kind": kind, "variant": variant, "model": model, "shapes": shapes,
                "folder": os.path.abspath(os.path.join(self.a.ckpt_dir, model)), "steps": steps or self.a.steps,
                "warmup": self.a.warmup if warmup is None else warmup, "rank": rank, "alpha": rank,
                "device": self.a.device, "dtype": self.a.dtype, "seed": self.a.seed, "lr": self.a.lr,
                "weights": self.a.weights, "cap_gib": cap_gib, "vocab": V.MODELS[model]["vocab_size"],
                "record": rec_path, "profile": kind == "throughput" and self.profiles(variant)}
        if os.path.exists(rec_path):
            os.remove(rec_path)
        res = self.spawn(name, spec, stack, timeout if timeout is not None else min(self.a.run_timeout, self.remaining()))
        self.durations[stack] = max(self.durations.get(stack, 0.0), res["wall_s"] / max(1, len(shapes)))
        try:
            with open(rec_path, encoding="utf-8") as fh:
                recs = json.load(fh)
        except (OSError, ValueError):
            recs = [{"kind": kind, "variant": variant, "model": model, "shape": f"{b}x{s}", "batch": b, "seq": s}
                    for b, s in shapes]
        for r in recs:
            r.update(wall_s=res["wall_s"], log=res["log"])
            if "tokens_per_s" in r or "error" in r:
                continue
            if res["timed_out"]:
                r.update(error=f"timeout after {res['wall_s']}s", timeout=True)
            else:
                r["error"] = f"exit {res['rc']} before finishing: {res['tail'][-600:]}"
        return recs

    def profiles(self, variant: str) -> bool:
        """Whether ``--profile`` asks for a profiled step of ``variant`` (all, or the ones it lists)."""
        p = self.a.profile
        return bool(p) and (p == "all" or variant in p.split(","))

    def summary(self, r: dict) -> str:
        head = f"{r['variant']:<14} {r['model']:<13} {r.get('shape', ''):<8}"
        if "error" in r:
            wall = f" (wall {r['wall_s']}s)" if r.get("wall_s") is not None else ""
            return f"{head} ERROR {r['error'].splitlines()[0][:160] if r['error'] else ''}{wall}"
        return (f"{head} {r['tokens_per_s']:>9,.0f} tok/s  median {r['median_step_s']:.3f}s  peak {r['peak_gib']:.2f}  "
                f"after load {r['after_load_gib']:.2f}  act {r['activation_gib']:.2f} GiB  loss {r['loss']:.4f}  "
                f"(wall {r.get('wall_s')}s)")

    def _run(self, model: str, variant: str, grp: list, ready: set) -> list[dict]:
        name = f"{variant}-{model}-" + "+".join(f"{b}x{s}" for b, s in grp)
        stack = V.STACK_OF[variant]
        learned = self.durations.get(stack)  # seconds per shape of this stack's slowest run so far
        need = min(self.a.run_timeout, learned * len(grp) if learned else estimate_s(stack, len(grp)))
        if model in ready and self.remaining() >= need:
            return self.train(name, variant, model, grp)
        why = "checkpoint missing (prepare failed)" if model not in ready else \
            f"skipped: {self.remaining():.0f}s left of the call's budget, ~{need:.0f}s needed"
        return [{"kind": "throughput", "variant": variant, "model": model, "shape": f"{b}x{s}", "error": why,
                 "skipped": True} for b, s in grp]

    def throughput(self, models, variants, shapes, ready) -> None:
        """Every model x variant x shape (or shape group) in its own subprocess, in this order.

        ``--jobs N`` > 1 runs N at once (CPU smoke only: runs sharing a GPU would time each other).
        """
        groups = [[s] for s in shapes] if not self.a.group_shapes else [shapes]
        plan = [(m, v, g) for m in models for v in variants for g in groups]
        if self.a.jobs > 1:
            with ThreadPoolExecutor(self.a.jobs) as pool:
                results = pool.map(lambda job: self._run(*job, ready), plan)
                for recs in results:
                    self._emit(recs)
        else:
            for job in plan:
                self._emit(self._run(*job, ready))

    def _emit(self, recs: list[dict]) -> None:
        for r in recs:
            self.add(r)
            self.say(self.summary(r))

    def maxseq(self, variants: list[str]) -> None:
        """Longest trainable sequence at batch 1 under the memory cap, one search per variant."""
        a, model = self.a, self.a.maxseq_model
        if model not in self.prepare([model]):
            for v in variants:
                self.add({"kind": "maxseq", "variant": v, "model": model, "error": "checkpoint missing"})
            return
        starts, maxes = MS.per_variant(a.maxseq_start, variants), MS.per_variant(a.maxseq_max, variants)
        step_of = MS.per_variant(a.maxseq_step, variants)
        steps_of = MS.per_variant(a.maxseq_steps, variants)
        for v in variants:
            probes, best = [], {}

            def probe(seq: int, v=v, probes=probes, best=best):
                r = self.train(f"maxseq-{v}-{model}-{seq}", v, model, [[1, seq]], kind="maxseq_probe",
                               steps=steps_of[v], warmup=0, rank=a.maxseq_rank, cap_gib=a.maxseq_cap_gib,
                               timeout=min(a.maxseq_timeout, self.remaining()))[0]
                ok = "error" not in r and r.get("steps_done") == steps_of[v]
                p = {"seq": seq, "ok": ok, "step_s": (r.get("step_s") or [None])[-1], "steps_s": r.get("step_s"),
                     "losses": r.get("losses"), "peak_gib": r.get("peak_gib"),
                     "reserved_peak_gib": r.get("reserved_peak_gib"), "wall_s": r.get("wall_s"),
                     "oom": r.get("oom"), "error": (r.get("error") or "")[:300] or None, "log": r.get("log")}
                probes.append(p)
                for k in ("gpu", "versions", "memory_kind"):
                    best.setdefault(k, r.get(k))
                if ok and seq >= best.get("seq", 0):
                    best.update(seq=seq, step_s=p["step_s"], peak_gib=p["peak_gib"])
                step = "" if p["step_s"] is None else f"{p['step_s']:.2f}s/step "
                self.say(f"maxseq {v:<14} {seq:>7} tokens: {'ok' if ok else 'FAIL'} {step}"
                         f"{'' if ok else (p['error'] or '')[:120]} (wall {p['wall_s']}s)")
                self.durations[f"maxseq-{v}"] = max(self.durations.get(f"maxseq-{v}", 0.0), r.get("wall_s") or 0.0)
                return None if r.get("timeout") else ok

            est = estimate_s(V.STACK_OF[v], 1)
            deadline_clock = lambda: self.elapsed() + self.durations.get(f"maxseq-{v}", est)  # noqa: E731
            res = MS.search(probe, starts[v], maxes[v], step_of[v], deadline=a.budget_s, clock=deadline_clock)
            rec = {"kind": "maxseq", "variant": v, "model": model, "cap_gib": a.maxseq_cap_gib, "rank": a.maxseq_rank,
                   "alpha": a.maxseq_rank, "steps": steps_of[v], "max_seq": res["max_seq"],
                   "first_fail": res["first_fail"], "complete": res["complete"], "resolution": step_of[v],
                   "step_s": best.get("step_s"), "peak_gib": best.get("peak_gib"), "probes": probes,
                   **{k: best.get(k) for k in ("gpu", "versions", "memory_kind")}}
            if res["max_seq"] is None:
                rec["error"] = "no probe passed" if res["complete"] else "search stopped before any pass"
            self.add(rec)
            self.say(f"maxseq {v}: longest {res['max_seq']} (first fail {res['first_fail']}, "
                     f"complete {res['complete']})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="default llama-3.1-8b,qwen3-8b (smoke: tiny-llama,tiny-qwen3)")
    ap.add_argument("--shapes", help="BxS list; default 2x2048,1x8192 (smoke: 2x64)")
    ap.add_argument("--variants", help="comma list or 'none'; default all eight (smoke: hf,corept)")
    ap.add_argument("--steps", type=int, help="timed steps; default 8 (smoke: 2)")
    ap.add_argument("--warmup", type=int, help="untimed first steps; default 2 (smoke: 1)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA r (alpha = r)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", help="results file: e2e-<date>-<tag>.json; default h200 (smoke: cpu-smoke)")
    ap.add_argument("--ckpt-dir", help="checkpoint cache; default /tmp/corept-e2e-ckpt (smoke: OUT/ckpt)")
    ap.add_argument("--work-dir", help="workers' cwd (unsloth's compile cache); default /tmp/corept-e2e-work")
    ap.add_argument("--site-base", default="", help="PYTHONPATH of hf/hf_bf16/liger/hf_qlora (and after corept's)")
    ap.add_argument("--site-corept", default="", help="corept's installed packages (corept variants)")
    ap.add_argument("--site-unsloth", default="", help="PYTHONPATH of the unsloth variants")
    ap.add_argument("--site-corept-prev", default="", help="an earlier commit's corept packages (the *_prev variants)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default cuda (smoke: cpu)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 (smoke: fp32)")
    ap.add_argument("--weights", default="checkpoint", choices=["checkpoint", "config"],
                    help="config: hf/hf_bf16/liger rebuild the seeded weights instead of reading the checkpoint")
    ap.add_argument("--group-shapes", action="store_true", help="all shapes of a variant x model in one process")
    ap.add_argument("--profile", nargs="?", const="all", default=None, metavar="VARIANTS",
                    help="one extra step per throughput run under torch.profiler: time per kernel and category; "
                         "alone: every run, with a comma list: those variants' runs only")
    ap.add_argument("--jobs", type=int, help="runs at once: 1 on a GPU (default); smoke default 4")
    ap.add_argument("--run-timeout", type=float, help="seconds per training subprocess; default 420")
    ap.add_argument("--prepare-timeout", type=float, default=420.0)
    ap.add_argument("--budget-s", type=float, help="whole call (default 540): runs that no longer fit are skipped")
    ap.add_argument("--maxseq", default="", help="variants for the longest-sequence search, e.g. hf_qlora,corept_qlora")
    ap.add_argument("--maxseq-model", default="llama-3.1-8b")
    ap.add_argument("--maxseq-cap-gib", type=float, default=24.0)
    ap.add_argument("--maxseq-rank", type=int, default=32)
    ap.add_argument("--maxseq-steps", default="2", help="steps per probe: N or variant=N,...")
    ap.add_argument("--maxseq-start", default="8192", help="N or variant=N,... (search start)")
    ap.add_argument("--maxseq-max", default="131072", help="N or variant=N,... (Llama-3.1: 131072 positions)")
    ap.add_argument("--maxseq-step", default="1024", help="resolution: N or variant=N,...")
    ap.add_argument("--maxseq-timeout", type=float, default=300.0, help="seconds per probe")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny llama/qwen3, hf and corept, fp32, 2 steps")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the workers' PYTHONPATHs, run nothing")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge results files into --out/e2e-<date>-<tag>.*")
    ap.add_argument("--link-site", metavar="DIR", help="link corept's packages + dist-infos into DIR and exit")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.link_site:
        print("linked:", ", ".join(_sibling("e2e_site").link_site(a.link_site, REPO)))
        return 0
    full = dict(models="llama-3.1-8b,qwen3-8b", variants=",".join(V.VARIANTS), shapes="2x2048,1x8192", steps=8,
                warmup=2, device="cuda", dtype="bf16", tag="h200", ckpt_dir="/tmp/corept-e2e-ckpt",
                work_dir="/tmp/corept-e2e-work", run_timeout=420.0, budget_s=540.0, jobs=1)
    smoke = dict(full, models="tiny-llama,tiny-qwen3", variants="hf,corept", shapes="2x64", steps=2, warmup=1,
                 device="cpu", dtype="fp32", tag="cpu-smoke", ckpt_dir=os.path.join(a.out, "ckpt"),
                 work_dir=os.path.join(a.out, "work"), run_timeout=180.0, budget_s=600.0, jobs=4)
    for k, v in (smoke if a.smoke else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.merge:
        print("wrote", *REP.write(REP.merge(a.merge), a.out, a.tag))
        return 0
    models, variants = _names(a.models, V.MODELS), _names(a.variants, V.VARIANTS)
    maxseq, shapes = _names(a.maxseq, V.VARIANTS), parse_shapes(a.shapes)
    if a.profile and a.profile != "all":
        _names(a.profile, V.VARIANTS)  # unknown names fail here, before any run
    d = Driver(a)
    if a.dry_run:
        for st in ("base", "corept", "unsloth"):
            print(f"{st:8} PYTHONPATH={d.env(st).get('PYTHONPATH', '(inherited: none)')}")
        print(f"throughput: models {models} x variants {variants} x shapes {shapes}; "
              f"maxseq: {maxseq} on {a.maxseq_model}; budget {a.budget_s}s")
        return 0
    extra = f"; maxseq {','.join(maxseq)}" if maxseq else ""
    d.say(f"e2e: {len(models)} model(s) x {len(variants)} variant(s) x {len(shapes)} shape(s){extra}; "
          f"budget {a.budget_s:.0f}s; out {a.out}")
    ready = d.prepare(models) if (models and variants) else set()
    if variants:
        d.throughput(models, variants, shapes, ready)
    if maxseq:
        d.maxseq(maxseq)
    jpath, mpath = REP.write(d.records, a.out, a.tag)
    print(REP.markdown(d.records))
    d.say(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
