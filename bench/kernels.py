"""Kernel benchmark: corept vs torch eager, torch.compile and Liger-Kernel, on one GPU.

Usage (on the GPU machine, from the repo root, with corept_kernels importable):
    python bench/kernels.py [--out bench/results] [--only rms_norm,rope] [--quick]

Times forward and forward+backward with ``triton.testing.do_bench`` (median), measures peak
allocated memory of one forward+backward, computes achieved bandwidth for memory-bound kernels
against a measured device-copy bandwidth, and writes ``kernels-<date>-<gpu>.json`` plus a markdown
table (``kernels-<date>-<gpu>.md``) that docs/benchmarks.md includes.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import BenchCase, environment  # noqa: E402

CASE_MODULES = ["bench.kernels_elementwise", "bench.kernels_loss", "bench.kernels_lora", "bench.kernels_experts"]


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), GB/s."""
    import triton

    n = 2 * 1024**3 // 4
    a = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    del a, b
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def _outputs(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if torch.is_tensor(o) and o.requires_grad]


def _upstream_grads(fn) -> list[torch.Tensor]:
    """Random upstream gradients shaped like ``fn``'s outputs, drawn once (outside the timed region)."""
    return [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in _outputs(fn())]


def _fwd_bwd(fn, grads):
    torch.autograd.backward(_outputs(fn()), grads)


def _first_output(fn) -> torch.Tensor:
    with torch.no_grad():
        out = fn()
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.detach().float()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN anywhere gives inf (never passes)."""
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def warm_up_gpu(seconds: float = 2.0) -> None:
    """Run matmuls for ``seconds`` so clocks are up before the first timed case."""
    import time

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def input_grads(case: BenchCase, fn) -> list[torch.Tensor]:
    """fp32 copies of the gradients one fwd+bwd of ``fn`` leaves on ``case.grad_inputs``
    (upstream gradients drawn from a fixed seed, so every implementation gets the same)."""
    for t in case.grad_inputs:
        t.grad = None
    torch.manual_seed(1234)
    _fwd_bwd(fn, _upstream_grads(fn))
    out = [t.grad.detach().float().clone() for t in case.grad_inputs]
    for t in case.grad_inputs:
        t.grad = None
    return out


def check(case: BenchCase, fn, ref_out, ref_grads) -> dict:
    """Relative error of ``fn``'s first output and of every input gradient against torch's.
    Run before timing: some peers (Liger's CE) overwrite their inputs with gradients."""
    rec = {}
    if ref_out is not None:
        rec["rel_err_vs_torch"] = _rel_err(_first_output(fn), ref_out)
    if ref_grads is not None:
        rec["grad_rel_err_vs_torch"] = max(_rel_err(g, r) for g, r in zip(input_grads(case, fn), ref_grads))
    return rec


def _profiled(case: BenchCase, fn, backward: bool, runs: int):
    """torch.profiler over ``runs`` forward (+backward) calls of ``fn`` after two untimed ones."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    grads = _upstream_grads(fn) if backward else None
    step = (lambda: _fwd_bwd(fn, grads)) if backward else fn
    with torch.set_grad_enabled(backward):
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                for t in case.grad_inputs:
                    t.grad = None
                step()
            torch.cuda.synchronize()
    for t in case.grad_inputs:
        t.grad = None
    return prof


def _device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)


def gpu_ms(case: BenchCase, fn, backward: bool, runs: int = 10) -> float:
    """Mean GPU busy time of one call: the summed durations of every CUDA kernel and memset/copy
    it launches (torch.profiler), free of the CPU launch overhead that wall-clock timing of
    sub-millisecond kernels measures instead (one stream: kernels do not overlap)."""
    prof = _profiled(case, fn, backward, runs)
    return sum(_device_us(e) for e in prof.key_averages()) / runs / 1e3


def profile(case: BenchCase, fn, top: int = 8) -> list[dict]:
    """CUDA kernels of three fwd+bwd runs of ``fn`` by total time: ``[{name, ms_per_run, calls}]``."""
    prof = _profiled(case, fn, case.backward, 3)
    rows = [{"name": e.key[:90], "ms_per_run": _device_us(e) / 3 / 1e3, "calls": e.count // 3}
            for e in prof.key_averages() if _device_us(e) > 0]
    return sorted(rows, key=lambda r: -r["ms_per_run"])[:top]


def measure(case: BenchCase, name: str, fn) -> dict:
    import triton

    rec = {"kernel": case.kernel, "shape": case.shape, "impl": name}
    try:
        with torch.no_grad():
            rec["fwd_ms"] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        grads = _upstream_grads(fn) if case.backward else None
        for t in case.grad_inputs:
            t.grad = None
        if case.backward:
            rec["fwd_bwd_ms"] = triton.testing.do_bench(lambda: _fwd_bwd(fn, grads), warmup=25, rep=100,
                                                        grad_to_none=case.grad_inputs, return_mode="median")
        rec["fwd_gpu_ms"] = gpu_ms(case, fn, backward=False)
        if case.backward:
            rec["fwd_bwd_gpu_ms"] = gpu_ms(case, fn, backward=True)
        torch.cuda.synchronize()
        for t in case.grad_inputs:
            t.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # upstream grads already allocated: not counted
        _fwd_bwd(fn, grads) if case.backward else fn()
        torch.cuda.synchronize()
        rec["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except Exception as exc:  # noqa: BLE001 - a failing peer is recorded, not fatal
        rec["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        for t in case.grad_inputs:
            t.grad = None
    return rec


def add_bandwidth(rec: dict, case: BenchCase, copy_gbs: float) -> None:
    """Achieved bandwidth from the GPU busy time (the kernels' own speed, launch overhead aside)."""
    if not case.memory_bound:
        return
    if case.bytes_fwd and "fwd_gpu_ms" in rec:
        gbs = case.bytes_fwd / (rec["fwd_gpu_ms"] * 1e-3) / 1e9
        rec["fwd_gbs"], rec["fwd_pct_copy_bw"] = gbs, 100 * gbs / copy_gbs
    if case.bytes_fwd_bwd and "fwd_bwd_gpu_ms" in rec:
        gbs = case.bytes_fwd_bwd / (rec["fwd_bwd_gpu_ms"] * 1e-3) / 1e9
        rec["fwd_bwd_gbs"], rec["fwd_bwd_pct_copy_bw"] = gbs, 100 * gbs / copy_gbs


def markdown(records: list[dict], env: dict) -> str:
    lines = [f"Kernels on {env.get('gpu')} (torch {env['torch']}, triton {env['triton']}, liger {env.get('liger_kernel')}), "
             f"{env['date']}. GPU ms: GPU busy time per call (sum of its CUDA kernels, torch.profiler, mean of 10); "
             f"wall ms: median wall time (`triton.testing.do_bench`), which includes the CPU launch overhead that "
             f"dominates sub-millisecond kernels; peak = extra allocated MiB of one fwd+bwd; %BW = bytes moved / GPU "
             f"time as a share of the measured copy bandwidth ({env['copy_bandwidth_gbs']:.0f} GB/s); errors are "
             f"relative (L2) against torch's output and input gradients.", "",
             "| kernel | shape | impl | fwd GPU ms | fwd+bwd GPU ms | fwd wall ms | fwd+bwd wall ms | peak MiB | fwd %BW | fwd+bwd %BW | rel err | grad rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=3: "–" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in records:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | error: {r['error'][:60]} | | | | | | | | |")
            continue
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | {fmt(r.get('fwd_gpu_ms'))} | {fmt(r.get('fwd_bwd_gpu_ms'))} "
                     f"| {fmt(r.get('fwd_ms'))} | {fmt(r.get('fwd_bwd_ms'))} "
                     f"| {fmt(r.get('peak_mib'), 0)} | {fmt(r.get('fwd_pct_copy_bw'), 0)} | {fmt(r.get('fwd_bwd_pct_copy_bw'), 0)} "
                     f"| {fmt(r.get('rel_err_vs_torch'), 6)} | {fmt(r.get('grad_rel_err_vs_torch'), 6)} |")
    profiles = [r for r in records if r.get("profile")]
    if profiles:
        lines += ["", "CUDA kernels per fwd+bwd (torch.profiler, mean of 3 runs):", ""]
        for r in profiles:
            lines.append(f"- {r['kernel']} {r['shape']} {r['impl']}: " + "; ".join(
                f"{p['name']} {p['ms_per_run']:.3f} ms x{p['calls']}" for p in r["profile"]))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--only", default="", help="comma-separated kernel names")
    ap.add_argument("--impls", default="", help="comma-separated implementation names")
    ap.add_argument("--merge", nargs=2, metavar=("BASE_JSON", "NEW_JSON"), default=None,
                    help="write BASE's records with every kernel that NEW measured replaced by NEW's "
                         "records (a re-run of some kernels after a change), then exit")
    ap.add_argument("--profile", default="rms_norm,layer_norm,rope,fused_linear_cross_entropy",
                    help="kernels whose corept and torch_compile runs are profiled ('' for none)")
    args = ap.parse_args()
    if args.merge:
        return merge(*args.merge, Path(args.out))
    # One torch.compile per case, but dynamo counts recompiles per function: past the default
    # limit (8) the later shapes would silently run eager and be reported as "torch_compile".
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    warm_up_gpu()
    env = environment()
    env["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    print(f"copy bandwidth {env['copy_bandwidth_gbs']:.0f} GB/s", flush=True)
    only = {k for k in args.only.split(",") if k}
    profiled = {k for k in args.profile.split(",") if k}
    impls = {k for k in args.impls.split(",") if k}
    records = []
    for modname in CASE_MODULES:
        try:
            cases = importlib.import_module(modname).cases("cuda")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            continue
        for case in cases:
            if only and case.kernel not in only:
                continue
            torch_fn = case.impls.get("torch")
            reference = _first_output(torch_fn) if torch_fn else None
            ref_grads = input_grads(case, torch_fn) if torch_fn and case.backward and case.grad_inputs else None
            for name, fn in case.impls.items():
                if impls and name not in impls:
                    continue
                try:
                    errs = check(case, fn, reference, ref_grads)
                except Exception as exc:  # noqa: BLE001 - recorded with the timing record
                    errs = {"check_error": f"{type(exc).__name__}: {exc}"}
                rec = {**measure(case, name, fn), **errs}
                if case.kernel in profiled and name in ("corept", "torch_compile") and "error" not in rec:
                    rec["profile"] = profile(case, fn)
                add_bandwidth(rec, case, env["copy_bandwidth_gbs"])
                records.append(rec)
                print(json.dumps(rec), flush=True)
                _write(Path(args.out), env, records)  # partial results survive a timeout
            del case, reference, ref_grads
            torch.cuda.empty_cache()
    _write(Path(args.out), env, records)
    print(markdown(records, env))
    return 0


def merge(base_json: str, new_json: str, out: Path) -> int:
    """BASE's records with the kernels NEW measured taken from NEW; environment from NEW, with
    BASE's kept under ``merged_from`` (GPU, versions, commit and command of both stay on record)."""
    base, new = json.loads(Path(base_json).read_text()), json.loads(Path(new_json).read_text())
    rerun = {r["kernel"] for r in new["records"]}
    records, placed = [], set()
    for r in base["records"]:
        if r["kernel"] in rerun:
            if r["kernel"] not in placed:
                records += [n for n in new["records"] if n["kernel"] == r["kernel"]]
                placed.add(r["kernel"])
        else:
            records.append(r)
    records += [n for n in new["records"] if n["kernel"] not in placed]
    env = {**new["environment"], "merged_from": {"kernels_kept": sorted({r["kernel"] for r in base["records"]} - rerun),
                                                 "environment": base["environment"]}}
    _write(out, env, records)
    print(f"merged: {sorted(rerun)} from {new_json}, the rest from {base_json}")
    return 0


def _write(out: Path, env: dict, records: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tag = f"kernels-{env['date']}-{(env.get('gpu') or 'cpu').split()[-1].lower()}"
    (out / f"{tag}.json").write_text(json.dumps({"environment": env, "records": records}, indent=2))
    (out / f"{tag}.md").write_text(markdown(records, env))


if __name__ == "__main__":
    sys.exit(main())
