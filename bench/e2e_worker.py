"""One end-to-end benchmark run, in its own process (started by bench/e2e.py, never imported).

Usage: ``python -P bench/e2e_worker.py SPEC.json`` where the spec says what to do:

* ``{"mode": "prepare", "models": [...], "ckpt_dir", "seed", "device", "dtype"}``: save checkpoints.
* ``{"mode": "train", "variant", "model", "folder", "shapes": [[B, S], ...], "steps", "warmup",
  "rank", "alpha", "device", "dtype", "seed", "weights", "cap_gib" (optional), "profile" (optional),
  "record": PATH}``:
  import the stack, cap memory if asked, load + LoRA, then per shape reset the adapters, run
  ``warmup + steps`` AdamW steps on seeded random tokens (labels = inputs) and measure; with
  ``profile``, one more step under torch.profiler (``bench/e2e_profile.py``) into ``rec["profile"]``.

Records (a JSON list, one per shape) are rewritten to ``record`` after every step, so a run that
is killed (timeout) still leaves what it measured. Memory on CUDA is ``torch.cuda`` allocated
bytes; on CPU (smoke only) process RSS.
"""
from __future__ import annotations

import datetime
import gc
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import time
import traceback

GIB = 2**30
_HERE = os.path.dirname(os.path.abspath(__file__))
_VERSIONED = {"torch": "torch", "triton": "triton", "transformers": "transformers", "peft": "peft",
              "accelerate": "accelerate", "bitsandbytes": "bitsandbytes", "liger_kernel": "liger-kernel",
              "unsloth": "unsloth", "unsloth_zoo": "unsloth_zoo", "trl": "trl", "datasets": "datasets",
              "corept": "corept", "corept_kernels": "corept-kernels"}


def load_sibling(name: str):
    """Import ``bench/<name>.py`` by path (bench/ stays off ``sys.path``)."""
    spec = importlib.util.spec_from_file_location(f"corept_bench_{name}", os.path.join(_HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def versions() -> dict:
    """Installed versions from package metadata (nothing is imported); ``None`` if absent."""
    from importlib import metadata

    out = {}
    for key, dist in _VERSIONED.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


class Memory:
    """Allocated memory on CUDA; resident set size of the process on CPU (smoke only)."""

    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda
        self.kind = "cuda_allocated" if cuda else "cpu_rss"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def now(self) -> float:
        if self.cuda:
            return self.torch.cuda.memory_allocated() / GIB
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
    """The caching allocator's event counters a step's host time can hide in: cudaMalloc/cudaFree
    (each cudaFree synchronizes the device), retries after a failed allocation (free the cache,
    try again) and whole-device syncs."""

    def counters(self) -> dict:
        """The allocator's :data:`COUNTERS` now (CUDA), or ``{}`` (CPU)."""
        if not self.cuda:
            return {}
        stats = self.torch.cuda.memory_stats()
        return {k[4:]: int(stats.get(k, 0)) for k in self.COUNTERS}

    def peak(self) -> tuple[float, float | None]:
        """(peak allocated, peak reserved) since the last reset; CPU: peak RSS of the process."""
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / GIB, self.torch.cuda.max_memory_reserved() / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, None


def batches(torch, vocab: int, b: int, s: int, n: int, seed: int) -> list:
    """``n`` random token batches ``[b, s]``, the same for every stack (CPU generator, fixed seed)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + b * 100_003 + s)
    return [torch.randint(0, vocab, (b, s), generator=g) for _ in range(n)]


def run_shape(torch, model, mem: Memory, rec: dict, spec: dict, shape, autocast, initial, flush) -> None:
    """Reset the adapters, run warm-up + timed steps at ``shape``, fill ``rec`` as it goes."""
    import contextlib

    b, s = shape
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, p0 in zip(trainable, initial):
            p.copy_(p0)
    opt = torch.optim.AdamW(trainable, lr=spec.get("lr", 1e-4))
    device = "cuda" if mem.cuda else "cpu"
    vocab = model.get_input_embeddings().weight.shape[0] if spec.get("vocab") is None else spec["vocab"]
    data = batches(torch, vocab, b, s, spec["warmup"] + spec["steps"] + int(bool(spec.get("profile"))), spec["seed"])
    extra = data.pop() if spec.get("profile") else None  # the profiled step's batch, after the timed ones
    mem.sync()
    rec["after_load_gib"] = round(mem.now(), 4)
    mem.reset_peak()
    # per step, besides its time: how long the host took to issue it (wall and main-thread CPU time
    # up to the first read of a result; a step whose issue time is its step time is host-bound, and
    # an issue CPU time well under the issue wall time means the host waited on something), and
    # the allocator's events (Memory.COUNTERS, CUDA only)
    rec["losses"], rec["step_s"], rec["issue_s"], rec["issue_cpu_s"], rec["step_alloc_events"] = [], [], [], [], []
    rec["step_gc"] = []  # per step: Python's cyclic collections [gen0, gen1, gen2] and their seconds
    gc_pause = _GcPauses()
    ctx = (lambda: torch.autocast("cuda", dtype=autocast)) if autocast is not None else contextlib.nullcontext
    for i, x in enumerate(data):
        x = x.to(device)
        mem.sync()
        c0, t0, h0 = mem.counters(), time.perf_counter(), time.thread_time()
        gc_pause.reset()
        with ctx():
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec["issue_s"].append(round(time.perf_counter() - t0, 4))
        rec["issue_cpu_s"].append(round(time.thread_time() - h0, 4))
        loss = float(out.loss.detach().float().item())
        del out
        mem.sync()
        rec["step_s"].append(time.perf_counter() - t0)
        rec["step_alloc_events"].append({k: v - c0[k] for k, v in mem.counters().items()})
        rec["step_gc"].append(gc_pause.read())
        rec["losses"].append(loss)
        peak, reserved = mem.peak()
        rec.update(peak_gib=round(peak, 4), reserved_peak_gib=None if reserved is None else round(reserved, 4),
                   steps_done=i + 1)
        flush()
        print(f"  step {i + 1}/{len(data)} {'(warm-up) ' if i < spec['warmup'] else ''}loss {loss:.4f} "
              f"{rec['step_s'][-1]:.3f}s peak {peak:.2f} GiB", flush=True)
    if extra is not None:  # after the timed steps and the peak: neither includes the profiler
        x = extra.to(device)

        def step():
            with ctx():
                out = model(input_ids=x, labels=x)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        profiler = load_sibling("e2e_profile")
        rec["profile"] = profiler.profiled_step(torch, step, mem.cuda)
        rec["host_profile"] = profiler.host_profiled_step(step, mem.sync)
        flush()
    timed = rec["step_s"][spec["warmup"]:] or rec["step_s"][-1:]
    rec["dynamo"] = _dynamo_counters(torch)
    rec.update(warmup_s=round(sum(rec["step_s"][:spec["warmup"]]), 3), spread=round(max(timed) / min(timed), 4),
               tokens_per_s=round(b * s * len(timed) / sum(timed), 1),
               median_tokens_per_s=round(b * s / statistics.median(timed), 1), median_step_s=statistics.median(timed),
               activation_gib=round(max(0.0, rec["peak_gib"] - rec["after_load_gib"]), 4),
               loss=rec["losses"][-1], loss0=rec["losses"][0])
    if not all(math.isfinite(v) for v in rec["losses"]):
        rec["error"] = "non-finite loss"
    gc_pause.close()
    del opt


class _GcPauses:
    """Counts Python's cyclic garbage collections per generation and their seconds (``gc.callbacks``):
    a full collection of a heap of ~10^6 objects pauses the host for tens of milliseconds, which a
    host-bound step shows as a spike."""

    def __init__(self):
        self.counts, self.seconds, self.t = [0, 0, 0], 0.0, None
        gc.callbacks.append(self._hook)

    def _hook(self, phase, info):
        if phase == "start":
            self.t = time.perf_counter()
        elif self.t is not None:
            self.counts[info["generation"]] += 1
            self.seconds += time.perf_counter() - self.t
            self.t = None

    def reset(self):
        self.counts, self.seconds = [0, 0, 0], 0.0

    def read(self) -> dict:
        return {"collections": list(self.counts), "s": round(self.seconds, 4)}

    def close(self):
        if self._hook in gc.callbacks:
            gc.callbacks.remove(self._hook)


def _dynamo_counters(torch) -> dict:
    """torch.compile's counters so far in this process (graphs compiled, frames, recompiles): a
    count that grows from shape to shape or step to step shows recompilation."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {group: dict(counters[group]) for group in ("stats", "frames", "recompiles", "graph_break")
            if counters.get(group)}


def train(spec: dict, records: list, flush) -> None:
    """Import the stack, cap memory, load + LoRA, then run every shape of the spec."""
    t0 = time.perf_counter()
    import torch

    variants = load_sibling("e2e_variants")
    variants.import_stack(spec["variant"])
    cuda = spec["device"] == "cuda"
    if cuda and spec.get("cap_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gib"] * GIB / total))
    mem = Memory(torch, cuda)
    env = {"gpu": torch.cuda.get_device_name(0) if cuda else None, "versions": versions(),
           "memory_kind": mem.kind, "import_s": round(time.perf_counter() - t0, 2),
           "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    for r in records:
        r.update(env)
    flush()
    t1 = time.perf_counter()
    torch.manual_seed(spec["seed"])
    model, autocast, info = variants.setup(
        spec["variant"], spec["model"], spec["folder"], device=spec["device"], dtype=spec["dtype"],
        max_seq=max(s for _, s in spec["shapes"]), rank=spec["rank"], alpha=spec["alpha"],
        weights=spec.get("weights", "checkpoint"), seed=spec["seed"])
    initial = [p.detach().to("cpu", copy=True) for p in model.parameters() if p.requires_grad]
    load_peak = mem.peak()[0] if cuda else None  # the load's own GPU peak (4-bit MoE: experts quantized on the way)
    for r in records:
        r.update(info, load_s=round(time.perf_counter() - t1, 2),
                 load_peak_gib=None if load_peak is None else round(load_peak, 4))
    flush()
    for rec, shape in zip(records, spec["shapes"]):
        try:
            run_shape(torch, model, mem, rec, spec, shape, autocast, initial, flush)
        except Exception as exc:  # noqa: BLE001 - record OOM and friends, go on with the next shape
            rec.update(error_record(exc))
            traceback.print_exc()
        flush()
        model.zero_grad(set_to_none=True)
        gc.collect()  # after the except block: its traceback no longer pins the failed step's tensors
        if cuda:
            torch.cuda.empty_cache()


def error_record(exc: BaseException) -> dict:
    """The fields a failed run adds to its record (``oom`` tells an out-of-memory failure apart)."""
    text = f"{type(exc).__name__}: {str(exc)[:500]}"
    return {"error": text, "oom": type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower(),
            "traceback": traceback.format_exc()[-3000:]}


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as fh:
        spec = json.load(fh)
    if spec["mode"] == "prepare":
        variants = load_sibling("e2e_variants")
        for name in spec["models"]:
            print(json.dumps(variants.prepare(name, os.path.join(spec["ckpt_dir"], name), spec["seed"],
                                              spec["device"], spec["dtype"])), flush=True)
        return 0
    base = {k: spec[k] for k in ("variant", "model", "steps", "warmup", "rank", "alpha", "device", "dtype")}
    base.update(kind=spec.get("kind", "throughput"), date=datetime.date.today().isoformat(),
                cap_gib=spec.get("cap_gib"), pythonpath=os.environ.get("PYTHONPATH", ""))
    records = [dict(base, shape=f"{b}x{s}", batch=b, seq=s, tokens_per_step=b * s) for b, s in spec["shapes"]]

    def flush():
        tmp = spec["record"] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=1)
        os.replace(tmp, spec["record"])

    flush()
    try:
        train(spec, records, flush)
    except Exception as exc:  # noqa: BLE001 - a failing stack is a record, not a crash
        for r in records:
            if "tokens_per_s" not in r and "error" not in r:
                r.update(error_record(exc))
        traceback.print_exc()
    flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
