"""One profiled training step of the end-to-end benchmark: where the time goes.

``summarize(prof, wall_s, cuda)`` turns a ``torch.profiler`` run of one step into a small dict
for the results record: busy time (summed CUDA kernel, memcpy and memset durations; on CPU the
summed self time of the ops), the step's wall time, the top kernels by time and the time per
category. Categories are a name heuristic (lower-cased substrings, first match wins); ``top``
keeps the exact names, so a misfiled kernel can be read there.
"""
from __future__ import annotations

CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("gemm", ("gemm", "cutlass", "nvjet", "cublas", "xmma", "aten::mm", "aten::bmm", "aten::addmm", "matmul")),
    ("copy_cast", ("memcpy", "memset", "copy", "to_copy", "cast", "fill")),
    ("norm", ("norm",)),
    ("rope", ("rope", "rotary")),
    ("activation", ("swiglu", "geglu", "glu", "silu", "gelu")),
    ("loss", ("cross_entropy", "entropy", "logsumexp", "nll")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("dequant", ("dequant", "nf4", "4bit", "kgemm")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "aten::")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _event_us(event, cuda: bool) -> float:
    if cuda:
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0)
    return float(event.self_cpu_time_total or 0)


def summarize(prof, wall_s: float, cuda: bool, top: int = 15) -> dict:
    """``{busy_ms, wall_ms, busy_pct, launches, by_category_ms, top: [{name, ms, calls, category}]}``.

    ``launches`` counts the step's kernels, memcpys and memsets (CPU: ops): each costs host time to
    issue, so when ``wall_ms`` exceeds ``busy_ms`` it says how much work the host had to issue."""
    rows = []
    for e in prof.key_averages():
        us = _event_us(e, cuda)
        if us > 0:
            rows.append({"name": e.key[:120], "ms": us / 1e3, "calls": int(e.count), "category": category(e.key)})
    rows.sort(key=lambda r: -r["ms"])
    busy = sum(r["ms"] for r in rows)
    by_cat: dict = {}
    for r in rows:
        by_cat[r["category"]] = by_cat.get(r["category"], 0.0) + r["ms"]
    wall_ms = wall_s * 1e3
    return {"busy_ms": round(busy, 3), "wall_ms": round(wall_ms, 3), "launches": sum(r["calls"] for r in rows),
            "busy_pct": round(100 * busy / wall_ms, 1) if wall_ms > 0 else None,
            "by_category_ms": {k: round(v, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top": [dict(r, ms=round(r["ms"], 3)) for r in rows[:top]],
            "timer": "cuda kernels" if cuda else "cpu ops (self time)"}


def profiled_step(torch, step, cuda: bool) -> dict:
    """Run ``step()`` once under ``torch.profiler`` (CUDA activity only on a GPU) and summarize."""
    import time

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return summarize(prof, wall, cuda)


def host_profiled_step(step, sync, top: int = 30) -> dict:
    """Run ``step()`` once under ``cProfile`` and return where the host's (Python) time went.

    ``{wall_ms, top_self: [{func, self_ms, cum_ms, calls}]}``, sorted by self time. ``func`` is
    ``file:line(name)`` with the path cut to its last two parts. When the step is host-bound this
    is the time that limits it; cProfile's own overhead inflates many small calls, so read the
    shares, not the absolute figures."""
    import cProfile
    import pstats
    import time

    sync()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    step()
    sync()
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    rows = []
    for (path, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        short = "/".join(path.replace("\\", "/").split("/")[-2:])
        rows.append({"func": f"{short}:{line}({name})", "self_ms": round(tottime * 1e3, 3),
                     "cum_ms": round(cumtime * 1e3, 3), "calls": int(ncalls)})
    rows.sort(key=lambda r: -r["self_ms"])
    by_cum = sorted(rows, key=lambda r: -r["cum_ms"])
    return {"wall_ms": round(wall * 1e3, 3), "top_self": rows[:top], "top_cum": by_cum[:top]}
