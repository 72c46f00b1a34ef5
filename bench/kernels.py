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

CASE_MODULES = ["bench.kernels_elementwise", "bench.kernels_loss", "bench.kernels_lora"]


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
    if not case.memory_bound:
        return
    if case.bytes_fwd and "fwd_ms" in rec:
        gbs = case.bytes_fwd / (rec["fwd_ms"] * 1e-3) / 1e9
        rec["fwd_gbs"], rec["fwd_pct_copy_bw"] = gbs, 100 * gbs / copy_gbs
    if case.bytes_fwd_bwd and "fwd_bwd_ms" in rec:
        gbs = case.bytes_fwd_bwd / (rec["fwd_bwd_ms"] * 1e-3) / 1e9
        rec["fwd_bwd_gbs"], rec["fwd_bwd_pct_copy_bw"] = gbs, 100 * gbs / copy_gbs


def markdown(records: list[dict], env: dict) -> str:
    lines = [f"Kernels on {env.get('gpu')} (torch {env['torch']}, triton {env['triton']}, liger {env.get('liger_kernel')}), "
             f"{env['date']}; median ms (`triton.testing.do_bench`); peak = extra allocated MiB of one fwd+bwd; "
             f"%BW = share of the measured copy bandwidth ({env['copy_bandwidth_gbs']:.0f} GB/s).", "",
             "| kernel | shape | impl | fwd ms | fwd+bwd ms | peak MiB | fwd %BW | fwd+bwd %BW | rel err vs torch |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=3: "–" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in records:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | error: {r['error'][:60]} | | | | | |")
            continue
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['impl']} | {fmt(r.get('fwd_ms'))} | {fmt(r.get('fwd_bwd_ms'))} "
                     f"| {fmt(r.get('peak_mib'), 0)} | {fmt(r.get('fwd_pct_copy_bw'), 0)} | {fmt(r.get('fwd_bwd_pct_copy_bw'), 0)} "
                     f"| {fmt(r.get('rel_err_vs_torch'), 6) if 'rel_err_vs_torch' in r else '–'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--only", default="", help="comma-separated kernel names")
    ap.add_argument("--impls", default="", help="comma-separated implementation names")
    args = ap.parse_args()
    env = environment()
    env["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    print(f"copy bandwidth {env['copy_bandwidth_gbs']:.0f} GB/s", flush=True)
    only = {k for k in args.only.split(",") if k}
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
            reference = _first_output(case.impls["torch"]) if "torch" in case.impls else None
            for name, fn in case.impls.items():
                if impls and name not in impls:
                    continue
                rec = measure(case, name, fn)
                if reference is not None and "error" not in rec:
                    rec["rel_err_vs_torch"] = _rel_err(_first_output(fn), reference)
                add_bandwidth(rec, case, env["copy_bandwidth_gbs"])
                records.append(rec)
                print(json.dumps(rec), flush=True)
                _write(Path(args.out), env, records)  # partial results survive a timeout
            del case
            torch.cuda.empty_cache()
    _write(Path(args.out), env, records)
    print(markdown(records, env))
    return 0


def _write(out: Path, env: dict, records: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tag = f"kernels-{env['date']}-{(env.get('gpu') or 'cpu').split()[-1].lower()}"
    (out / f"{tag}.json").write_text(json.dumps({"environment": env, "records": records}, indent=2))
    (out / f"{tag}.md").write_text(markdown(records, env))


if __name__ == "__main__":
    sys.exit(main())
