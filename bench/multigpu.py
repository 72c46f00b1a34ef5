"""Multi-GPU benchmark: DDP speed-up over one GPU, an FSDP2 model too big for one GPU, the CLI launchers.

    python3 -P bench/multigpu.py --out $OUT                 # 2 GPUs: every part, ~6-7 min
    python3 -P bench/multigpu.py --out /tmp/mg --dry-run    # CPU, gloo, tiny model: every code path

Parts (each in its own ``torchrun``, bounded by its own timeout and by ``--budget-s``; parts that
no longer fit are recorded as skipped):

1. ``single``: Llama-3.1-8B architecture, random bf16 weights, corept + LoRA r16 on the 7
   projections, offloaded checkpointing, 2x2048 tokens: tokens/s and peak memory on one GPU;
2. ``ddp``: the same per GPU on ``--nproc`` GPUs under DDP: global tokens/s, speed-up over
   ``single`` (target >= 1.85x on 2 GPUs), per-GPU peak memory;
3. ``fsdp``: Llama-3.1-70B architecture (141 GB of bf16 weights: more than one H200), built on the
   meta device and materialized shard by shard, FSDP2 + LoRA, 5 steps: finite loss, tokens/s,
   per-GPU peak memory (and what ``corept plan --gpus N --distributed fsdp`` predicted);
4. ``cli``: ``torchrun -m corept train --distributed ddp`` / ``fsdp`` / ``fsdp --load-in-4bit`` on
   a tiny model, 3 steps each (accelerate's FSDP2 plugin through TRL; CUDA only for fsdp).

Writes ``--out/multigpu-<date>-<tag>.json`` (records with GPU, versions, date, command) and ``.md``
after every part; worker logs in ``--out/logs``. This process imports only the standard library.
Workers run with ``python3 -P`` (bench/ and the repository root stay off ``sys.path``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "multigpu_worker.py")
PART_CAP_S = {"single": 150, "ddp": 170, "fsdp": 280, "cli": 240}
PART_MIN_S = {"single": 45, "ddp": 50, "fsdp": 90, "cli": 40}
DDP_TARGET = 1.85


class Driver:
    def __init__(self, a):
        self.a, self.t0, self.records = a, time.monotonic(), []
        self.command = "python3 -P bench/multigpu.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
        self.date = datetime.date.today().isoformat()
        self.base = os.path.join(a.out, f"multigpu-{self.date}-{a.tag}")
        for d in ("logs", "specs", "work"):
            os.makedirs(os.path.join(a.out, d), exist_ok=True)

    def remaining(self) -> float:
        return self.a.budget_s - (time.monotonic() - self.t0)

    def env(self) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env.setdefault("NCCL_NVLS_ENABLE", "0")  # the 2xH200 machine: NVLink multicast stays off
        paths = [p for p in (self.a.site_corept, self.a.site_base) if p]
        paths += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(os.path.abspath(p) for p in paths))
        if self.a.dry_run:
            env.pop("TRITON_INTERPRET", None)  # CPU: corept's torch twins
            env["OMP_NUM_THREADS"] = "1"
        return env

    def spawn(self, name: str, argv: list[str], timeout: float) -> dict:
        log_path = os.path.join(self.a.out, "logs", name + ".log")
        t, timed_out = time.monotonic(), False
        with open(log_path, "w", encoding="utf-8") as log:
            log.write("# " + " ".join(shlex.quote(x) for x in argv) + "\n")
            log.flush()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                    cwd=os.path.join(self.a.out, "work"), start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # this part's process group only
                rc = proc.wait()
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            tail = fh.read()[-2000:]
        return {"rc": rc, "timed_out": timed_out, "wall_s": round(time.monotonic() - t, 1),
                "log": os.path.relpath(log_path, self.a.out), "tail": tail}

    def torchrun(self, nproc: int, *cmd: str) -> list[str]:
        return [self.a.python, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                "--no-python", self.a.python, "-P", *cmd]

    def timeout(self, part: str) -> float | None:
        left = self.remaining() - 5
        return None if left < PART_MIN_S[part] * (0.2 if self.a.dry_run else 1) else min(PART_CAP_S[part], left)

    def add(self, rec: dict) -> None:
        self.records.append(rec)
        self.write()
        status = rec.get("error") or rec.get("skipped") or "ok"
        print(f"[{time.monotonic() - self.t0:6.1f}s] {rec['part']}: {status} "
              f"{rec.get('tokens_per_s', '')} tok/s, peak {rec.get('peak_gib_max', '')}", flush=True)

    # ------------------------------------------------------------------ parts
    def train_part(self, part: str, engine: str, nproc: int, model: str, steps: int, warmup: int) -> None:
        timeout = self.timeout(part)
        if timeout is None:
            return self.add({"part": part, "skipped": f"not enough of the budget left ({self.remaining():.0f} s)"})
        record = os.path.join(self.a.out, "specs", part + ".record.json")
        spec = {"part": part, "engine": engine, "model": model, "batch": self.a.batch, "seq": self.a.seq,
                "steps": steps, "warmup": warmup, "rank": self.a.rank, "seed": 0, "record": record,
                "device": "cpu" if self.a.dry_run else "cuda"}
        spec_path = os.path.join(self.a.out, "specs", part + ".json")
        with open(spec_path, "w", encoding="utf-8") as fh:
            json.dump(spec, fh, indent=1)
        run = self.spawn(part, self.torchrun(nproc, WORKER, spec_path), timeout)
        try:
            with open(record, encoding="utf-8") as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            rec = {k: spec[k] for k in ("part", "engine", "model", "batch", "seq", "steps", "warmup")}
            rec["error"] = "no record written (see the log)"
        if run["rc"] != 0 and "error" not in rec:
            rec["error"] = f"exit code {run['rc']}" + (" (timed out)" if run["timed_out"] else "")
        if "tokens_per_s" not in rec and "error" not in rec:
            rec["error"] = "timed out" if run["timed_out"] else "no throughput measured"
        rec.update(wall_s=run["wall_s"], log=run["log"], timed_out=run["timed_out"], command=self.command)
        if "error" in rec:
            rec["log_tail"] = run["tail"]
        self.add(rec)

    def cli_part(self) -> None:
        rec = {"part": "cli", "runs": []}
        timeout = self.timeout("cli")
        if timeout is None:
            return self.add(dict(rec, skipped=f"not enough of the budget left ({self.remaining():.0f} s)"))
        folder = os.path.join(self.a.out, "work", "tiny-chat")
        prep = self.spawn("cli-prepare", [self.a.python, "-P", "-c", "import sys, pathlib; from corept.training."
                                          "defaults import build_tiny_chat_model as b; b(pathlib.Path(sys.argv[1]), \"llama\")",
                                          folder], min(60.0, timeout))
        data = os.path.join(REPO, "corept", "data", "corept_sft.jsonl")
        runs = [("ddp", [])] + ([] if self.a.dry_run else [("fsdp", []), ("fsdp", ["--load-in-4bit"])])
        for mode, extra in runs:
            name = f"cli-{mode}" + ("-qlora" if extra else "")
            left = self.remaining() - 5
            if prep["rc"] != 0 or left < 20:
                rec["runs"].append({"name": name, "skipped": "model not prepared" if prep["rc"] else "budget"})
                continue
            out = os.path.join(self.a.out, "work", name)
            argv = self.torchrun(self.a.nproc, "-m", "corept", "train", "--model", folder, "--data", data,
                                 "--output", out, "--overwrite", "--distributed", mode, "--max-steps", "3",
                                 "--batch-size", "2", "--max-seq-length", "256", *extra)
            run = self.spawn(name, argv, min(left, 150.0))
            item = {"name": name, "rc": run["rc"], "wall_s": run["wall_s"], "log": run["log"],
                    "timed_out": run["timed_out"]}
            try:
                with open(os.path.join(out, "run.json"), encoding="utf-8") as fh:
                    got = json.load(fh)
                item.update(loss=got["loss"], applied=got["applied"], adapter=got["adapter"])
            except (OSError, ValueError, KeyError):
                item["log_tail"] = run["tail"]
            rec["runs"].append(item)
        if any(r.get("rc") not in (0, None) for r in rec["runs"]):
            rec["error"] = "a launcher run failed: " + ", ".join(r["name"] for r in rec["runs"] if r.get("rc"))
        self.add(dict(rec, command=self.command))

    # ------------------------------------------------------------------ results
    def summary(self) -> dict:
        by = {r["part"]: r for r in self.records}
        out = {}
        one, ddp = by.get("single", {}), by.get("ddp", {})
        if one.get("tokens_per_s") and ddp.get("tokens_per_s"):
            out["ddp_speedup"] = round(ddp["tokens_per_s"] / one["tokens_per_s"], 3)
            out["ddp_target"] = DDP_TARGET
            out["ddp_meets_target"] = out["ddp_speedup"] >= DDP_TARGET
        fs = by.get("fsdp", {})
        if fs.get("losses"):
            out["fsdp_finite_loss"] = "error" not in fs
        return out

    def write(self) -> None:
        doc = {"date": self.date, "tag": self.a.tag, "command": self.command, "summary": self.summary(),
               "records": self.records}
        with open(self.base + ".json.tmp", "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(self.base + ".json.tmp", self.base + ".json")
        with open(self.base + ".md", "w", encoding="utf-8") as fh:
            fh.write(markdown(doc))


def _fmt(v, spec="") -> str:
    return "—" if v is None or v == "" else format(v, spec)


def markdown(doc: dict) -> str:
    """The results as a markdown table (one row per training part) plus the CLI runs."""
    recs = [r for r in doc["records"] if r["part"] != "cli"]
    first = next((r for r in recs if r.get("gpu") or r.get("versions")), {})
    v = first.get("versions", {})
    lines = [f"# Multi-GPU benchmark {doc['date']} ({doc['tag']})", "",
             f"GPU: {first.get('gpu')}; torch {v.get('torch')}, transformers {v.get('transformers')}, "
             f"peft {v.get('peft')}, triton {v.get('triton')}; NCCL_NVLS_ENABLE={first.get('nccl_nvls_enable')}", "",
             f"Command: `{doc['command']}`", "",
             "| part | engine | GPUs | model | tokens per GPU per step | tokens/s (all GPUs) | per-GPU peak GiB "
             "(each rank) | planner GiB | loss first → last | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        peaks = ", ".join(_fmt(x, ".2f") for x in r.get("peak_gib_per_rank", [])) or "—"
        loss = f"{_fmt(r.get('loss0'), '.4f')} → {_fmt(r.get('loss'), '.4f')}"
        status = "skipped: " + r["skipped"] if r.get("skipped") else (r.get("error") or "ok")[:80]
        tokens = r["batch"] * r["seq"] if r.get("batch") else None
        lines.append(f"| {r['part']} | {r.get('engine', '—')} | {r.get('gpus', '—')} | {r.get('model', '—')} | "
                     f"{_fmt(tokens, ',')} | {_fmt(r.get('tokens_per_s'), ',.0f')} | {peaks} | "
                     f"{_fmt(r.get('predicted_peak_gib'), '.2f')} | {loss} | {status} |")
    s = doc["summary"]
    if "ddp_speedup" in s:
        lines += ["", f"DDP speed-up over one GPU: **{s['ddp_speedup']:.2f}x** (target {s['ddp_target']}x: "
                      f"{'met' if s['ddp_meets_target'] else 'NOT met'})."]
    for r in (r for r in doc["records"] if r["part"] == "cli"):
        lines += ["", "CLI launcher runs (`torchrun --nproc-per-node N -m corept train --distributed ...`, 3 steps):"]
        for run in r.get("runs", []):
            loss = run.get("loss", {})
            lines.append(f"- {run['name']}: " + (run.get("skipped") and f"skipped ({run['skipped']})" or
                         f"exit {run.get('rc')}, {run.get('wall_s')} s, loss first {loss.get('first')} "
                         f"last {loss.get('last')}"))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", help="results file multigpu-<date>-<tag>.json (default h200x2; dry run: cpu-dry)")
    ap.add_argument("--parts", default="single,ddp,fsdp,cli")
    ap.add_argument("--nproc", type=int, default=2, help="GPUs (processes) of the ddp/fsdp/cli parts")
    ap.add_argument("--model", help="ddp model (default llama-3.1-8b; dry run tiny-llama)")
    ap.add_argument("--fsdp-model", help="default llama-3.1-70b (dry run tiny-llama)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, help="default 2048 (dry run 64)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, help="timed steps of single/ddp (default 8; dry run 2)")
    ap.add_argument("--fsdp-steps", type=int, default=5, help="FSDP steps after one warm-up (dry run 2)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="the whole call; later parts are skipped")
    ap.add_argument("--site-corept", default="", help="PYTHONPATH entry with corept's packages (first)")
    ap.add_argument("--site-base", default="", help="PYTHONPATH entry with the wheels the image lacks")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny model, 2 steps: every code path")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    dry = a.dry_run
    a.tag = a.tag or ("cpu-dry" if dry else "h200x2")
    a.model = a.model or ("tiny-llama" if dry else "llama-3.1-8b")
    a.fsdp_model = a.fsdp_model or ("tiny-llama" if dry else "llama-3.1-70b")
    a.seq = a.seq or (64 if dry else 2048)
    a.steps = a.steps or (2 if dry else 8)
    fsdp_steps = 2 if dry else a.fsdp_steps
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PART_CAP_S)
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; known: {list(PART_CAP_S)}")
    os.makedirs(a.out, exist_ok=True)
    d = Driver(a)
    warm = 1 if dry else 2
    for part in parts:
        if part == "single":
            d.train_part("single", "single", 1, a.model, a.steps, warm)
        elif part == "ddp":
            d.train_part("ddp", "ddp", a.nproc, a.model, a.steps, warm)
        elif part == "fsdp":
            d.train_part("fsdp", "fsdp", a.nproc, a.fsdp_model, fsdp_steps, 1)
        else:
            d.cli_part()
    d.write()
    print(f"wrote {d.base}.json and .md; summary {json.dumps(d.summary())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
