"""GPU probe: what the fused LoRA paths' adapter branch costs, by adapter dtype and GEMM form.

Llama-3.1-8B MLP and q/k/v shapes at 2x2048 tokens (the e2e 2k shape), r 16; and a sweep of the
rank-add kernel's tile and warps (its measured time was ~4x its bandwidth bound, docs/perf-notes.md). Times are CUDA-event
medians of 20 calls after 5 warm-ups. Prints one JSON object per line and writes them to
``$OUT/lora-branch-probe.jsonl`` when ``--out`` is given. Not part of the results tables: it
answers "how much of a step is the fp32 branch, and what do the alternative GEMM forms cost".

    python3 -P bench/lora_branch_probe.py --out $OUT [--only rank_add,cpu_side]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

H, INTER, Q, KV, R, N = 4096, 14336, 4096, 1024, 16, 4096


def _time(fn, reps=20, warm=5) -> float:
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def _lws(outs, in_f, adapter_dtype, dev):
    from corept_kernels.lora import LoraWeights

    g = torch.Generator(device=dev).manual_seed(0)
    return [LoraWeights(torch.randn(o, in_f, device=dev, generator=g, dtype=torch.bfloat16) * 0.02,
                        (torch.randn(R, in_f, device=dev, generator=g) * 0.02).to(adapter_dtype).requires_grad_(),
                        (torch.randn(o, R, device=dev, generator=g) * 0.02).to(adapter_dtype).requires_grad_(), 1.0)
            for o in outs]


def fused_cases(dev, emit):
    from corept_kernels.lora import lora_mlp, lora_qkv

    for adt in (torch.float32, torch.bfloat16):
        x = (torch.randn(N, H, device=dev) * 0.5).bfloat16().requires_grad_()
        gate, up = _lws((INTER, INTER), H, adt, dev)
        (down,) = _lws((H,), INTER, adt, dev)
        dy = torch.randn(N, H, device=dev).bfloat16()
        fwd = _time(lambda: lora_mlp(x, gate, up, down, "swiglu"))
        fb = _time(lambda: lora_mlp(x, gate, up, down, "swiglu").backward(dy))
        emit(case="lora_mlp", adapters=str(adt), fwd_ms=fwd, fwd_bwd_ms=fb)
        q, k, v = _lws((Q, KV, KV), H, adt, dev)
        dq = [torch.randn(N, w, device=dev).bfloat16() for w in (Q, KV, KV)]
        fwd = _time(lambda: lora_qkv(x, q, k, v))
        fb = _time(lambda: torch.autograd.backward(lora_qkv(x, q, k, v), dq))
        emit(case="lora_qkv", adapters=str(adt), fwd_ms=fwd, fwd_bwd_ms=fb)


def gemm_forms(dev, emit):
    x = torch.randn(N, H, device=dev).bfloat16()
    W = (torch.randn(INTER, H, device=dev) * 0.02).bfloat16()
    A, B = torch.randn(R, H, device=dev) * 0.02, torch.randn(INTER, R, device=dev) * 0.02
    y = x @ W.t()
    emit(case="base_gemm", shape=[N, H, INTER], ms=_time(lambda: x @ W.t()))
    xa32 = x.float() @ A.t()
    # today's fp32 branch on one projection (cast-free part): z = xa B^T fp32, y = (z + y).bf16
    emit(case="branch_fp32_add", ms=_time(lambda: (xa32 @ B.t()).add_(y).to(torch.bfloat16)))
    emit(case="cast_x_fp32", ms=_time(lambda: x.float()))
    Bb, xab = B.bfloat16(), xa32.bfloat16()
    emit(case="branch_addmm_bf16_k16", ms=_time(lambda: y.clone().addmm_(xab, Bb.t())))
    emit(case="clone_y", ms=_time(lambda: y.clone()))
    k3 = torch.cat([xab, xab, xab], 1)
    B3 = torch.cat([Bb, Bb, Bb], 1)
    emit(case="branch_addmm_bf16_k48", ms=_time(lambda: y.clone().addmm_(k3, B3.t())))
    try:
        out = torch.mm(x, A.t().bfloat16(), out_dtype=torch.float32)
        ok = out.dtype == torch.float32
        emit(case="mm_out_dtype_fp32", ok=ok, ms=_time(lambda: torch.mm(x, A.t().bfloat16(), out_dtype=torch.float32)))
    except Exception as e:  # noqa: BLE001 - a probe: record what the stack says
        emit(case="mm_out_dtype_fp32", ok=False, error=repr(e)[:300])
    emit(case="xa_fp32_gemm", ms=_time(lambda: x.float() @ A.t()))
    A2 = torch.cat([A.bfloat16(), (A - A.bfloat16().float()).bfloat16()], 0)
    emit(case="xa_split_bf16_gemm", ms=_time(lambda: (x @ A2.t()).float()))
    dy = torch.randn(N, INTER, device=dev).bfloat16()
    emit(case="dxa_fp32_castdy", ms=_time(lambda: dy.float() @ B))
    B2 = torch.cat([Bb, (B - Bb.float()).bfloat16()], 1)
    emit(case="dxa_split_bf16", ms=_time(lambda: dy @ B2))
    emit(case="dB_fp32", ms=_time(lambda: dy.float().t() @ xa32))


def cpu_side(dev, emit):
    """Where the host time of one fp32-adapter q/k/v and MLP fwd+bwd goes (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from corept_kernels.lora import lora_mlp, lora_qkv

    x = (torch.randn(N, H, device=dev) * 0.5).bfloat16().requires_grad_()
    q, k, v = _lws((Q, KV, KV), H, torch.float32, dev)
    gate, up = _lws((INTER, INTER), H, torch.float32, dev)
    (down,) = _lws((H,), INTER, torch.float32, dev)
    dq = [torch.randn(N, w, device=dev).bfloat16() for w in (Q, KV, KV)]
    dy = torch.randn(N, H, device=dev).bfloat16()

    def once():
        torch.autograd.backward(lora_qkv(x, q, k, v), dq)
        lora_mlp(x, gate, up, down, "swiglu").backward(dy)

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            once()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    top = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:14]
    emit(case="cpu_side_qkv_mlp_x5", ops=[{"name": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3)}
                                          for e in top],
         total_self_cpu_ms=round(sum(e.self_cpu_time_total for e in ev) / 1e3, 2))


def rank_add_sweep(dev, emit):
    """The rank-add kernel's time and bandwidth per tile/warps config, factor load form and dot
    precision (it reads and writes ``y``: 4 B per element), on the gate/up output ``[N, I]`` and the
    q/o output ``[N, H]``, r 16."""
    import corept_kernels.lora.rank_add as ra

    default = (ra.BLOCK_M, ra.BLOCK_N, ra.NUM_WARPS, ra.TRANSPOSED_V_MIN_N, ra.DOT_PRECISION)
    for width in (INTER, H):
        y = torch.randn(N, width, device=dev).bfloat16()
        u, B = torch.randn(N, R, device=dev), torch.randn(width, R, device=dev)
        for precision in ("ieee", "tf32x3"):
            for by_rows in (True, False):
                for bm, bn, w in [(64, 128, 8), (64, 128, 4), (32, 128, 4), (128, 128, 8), (64, 256, 8),
                                  (128, 64, 4), (32, 256, 8), (16, 256, 4), (128, 128, 4), (64, 64, 4)]:
                    ra.BLOCK_M, ra.BLOCK_N, ra.NUM_WARPS = bm, bn, w
                    ra.TRANSPOSED_V_MIN_N, ra.DOT_PRECISION = (0 if by_rows else None), precision
                    ms = _time(lambda: ra.rank_add_triton_(y, u, B.t(), 1.0, False))
                    emit(case="rank_add", width=width, block_m=bm, block_n=bn, warps=w, transposed_v_load=by_rows,
                         precision=precision, ms=ms, gbps=round(4 * N * width / ms / 1e6, 1))
    ra.BLOCK_M, ra.BLOCK_N, ra.NUM_WARPS, ra.TRANSPOSED_V_MIN_N, ra.DOT_PRECISION = default


PARTS = {"gemm": gemm_forms, "fused": fused_cases, "rank_add": rank_add_sweep,
         "cpu_side": cpu_side}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma list of {list(PARTS)}")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []

    def emit(**kw):
        rows.append(kw)
        print(json.dumps(kw), flush=True)

    emit(case="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
         tf32=torch.backends.cuda.matmul.allow_tf32)
    for part in args.only.split(","):
        PARTS[part.strip()](dev, emit)
    if args.out:
        with open(os.path.join(args.out, "lora-branch-probe.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
