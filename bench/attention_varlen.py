"""Varlen (packed, document-causal) attention on one GPU: corept vs flex attention, SDPA and flash-attn.

Usage (on the GPU machine, from the repo root):
    PYTHONPATH=kernels python bench/attention_varlen.py [--tokens 16384] [--reps 20] [--out bench/results]

Workload: one packed batch of ``--tokens`` tokens (default 16384). Document lengths are drawn
i.i.d. from a log-normal distribution, ``exp(N(ln 1024, 1.2^2))`` rounded, clipped to
``[64, 8192]`` (heavy tailed: median 1024, a few documents in the thousands), until the batch is
full; the last document takes the remaining tokens (also at least 64: a shorter remainder joins
the previous document). The lengths are recorded in the results.

Configs: ``llama`` (Hq=32, Hkv=8, D=128, bf16, causal) and ``gemma`` (Hq=32, Hkv=8, D=256,
window 4096, softcap 50). Contenders, each timed as forward and forward+backward (median of
``--reps`` after ``--warmup`` runs, CUDA events; the backward takes a fixed random upstream gradient):

* ``corept``: :func:`corept_kernels.attention.varlen_attention`;
* ``flex``: ``torch.nn.attention.flex_attention`` under ``torch.compile`` with a document-causal
  ``BlockMask`` (built once, outside the timing; softcap as a ``score_mod``);
* ``sdpa_dense_mask``: SDPA with a dense ``[T, T]`` boolean document mask (llama only);
* ``sdpa_per_doc``: SDPA ``is_causal=True`` looped over the documents (llama only);
* ``flash_attn``: ``flash_attn_varlen_func`` when the package imports.

``--doc-length N`` replaces the mix by documents of ``N`` tokens: plain causal rows (an unpacked
batch), where ``sdpa_per_doc`` is SDPA's own causal kernel per row.

A contender that cannot run records why instead of a time. Before timing, every contender's output
and input gradients on a smaller packed batch (``--check-tokens``) are compared with an fp32
per-document reference (max abs error / max abs reference); the errors are recorded.
Writes ``attention-varlen-<date>-<gpu>.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import environment  # noqa: E402

CONFIGS = {
    "llama": dict(Hq=32, Hkv=8, D=128, window=None, softcap=None),
    "gemma": dict(Hq=32, Hkv=8, D=256, window=4096, softcap=50.0),
}


def doc_lengths(tokens: int, gen: torch.Generator, lo: int = 64, hi: int = 8192) -> list[int]:
    """Log-normal document lengths (median 1024, sigma 1.2) clipped to ``[lo, hi]``, summing to ``tokens``."""
    lens: list[int] = []
    while sum(lens) < tokens:
        x = math.exp(math.log(1024) + 1.2 * torch.randn((), generator=gen).item())
        lens.append(int(min(max(round(x), lo), hi)))
    lens[-1] -= sum(lens) - tokens
    if lens[-1] < lo and len(lens) > 1:
        lens[-2] += lens.pop()
    return lens


def _mask_fn(doc, window):
    def mask_mod(b, h, qi, ki):
        keep = (doc[qi] == doc[ki]) & (ki <= qi)
        return keep & (qi - ki < window) if window is not None else keep
    return mask_mod


def make_contenders(q, k, v, cu, lens, scale, window, softcap) -> dict:
    """name -> setup: a zero-argument function that prepares the contender (masks, compilation)
    and returns its run function ``() -> [T, Hq, D]`` output, or raises why it cannot run."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    max_len = max(lens)
    pos = torch.arange(T, device=q.device)
    doc = torch.repeat_interleave(torch.arange(len(lens), device=q.device), torch.tensor(lens, device=q.device))
    heads = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731  [T, H, D] -> [1, H, T, D]
    setups = {}

    def corept():
        from corept_kernels.attention import varlen_attention
        return lambda: varlen_attention(q, k, v, cu, max_len, scale=scale, window=window, softcap=softcap)
    setups["corept"] = corept

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        mask = create_block_mask(_mask_fn(doc, window), None, None, T, T, device=q.device)
        fn = torch.compile(flex_attention, dynamic=False)
        score_mod = None
        if softcap is not None:
            def score_mod(score, b, h, qi, ki):
                return softcap * torch.tanh(score / softcap)
        return lambda: fn(heads(q), heads(k), heads(v), score_mod=score_mod, block_mask=mask, scale=scale,
                          enable_gqa=group > 1)[0].transpose(0, 1)
    setups["flex"] = flex

    if window is None and softcap is None:
        def sdpa_dense_mask():
            # kv heads repeated (timed): SDPA's memory-efficient kernel, the one taking a mask, has no GQA
            allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
            return lambda: F.scaled_dot_product_attention(
                heads(q), heads(k.repeat_interleave(group, 1)), heads(v.repeat_interleave(group, 1)),
                attn_mask=allowed, scale=scale)[0].transpose(0, 1)
        setups["sdpa_dense_mask"] = sdpa_dense_mask

        def sdpa_per_doc():
            bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
            return lambda: torch.cat([F.scaled_dot_product_attention(
                heads(q[s:e]), heads(k[s:e]), heads(v[s:e]), is_causal=True, scale=scale,
                enable_gqa=group > 1)[0].transpose(0, 1) for s, e in bounds])
        setups["sdpa_per_doc"] = sdpa_per_doc

    def flash_attn():
        from flash_attn import flash_attn_varlen_func
        kw = dict(softmax_scale=scale, causal=True)
        if window is not None:
            kw["window_size"] = (window - 1, 0)  # keys i - window + 1 .. i, as transformers' sliding window
        if softcap is not None:
            kw["softcap"] = softcap
        return lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, **kw)
    setups["flash_attn"] = flash_attn
    return setups


def reference(q, k, v, lens, scale, window, softcap):
    """fp32 per-document attention (explicit masked softmax), ``[T, Hq, D]``."""
    outs, s = [], 0
    group = q.shape[1] // k.shape[1]
    for n in lens:
        qd, kd, vd = (t[s:s + n].float().transpose(0, 1) for t in (q, k, v))
        kd, vd = kd.repeat_interleave(group, 0), vd.repeat_interleave(group, 0)
        scores = qd @ kd.transpose(1, 2) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(n, device=q.device)
        keep = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
        outs.append((scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vd).transpose(0, 1))
        s += n
    return torch.cat(outs)


def _inputs(lens, cfg, dtype, gen_seed):
    torch.manual_seed(gen_seed)
    T = sum(lens)
    q = torch.randn(T, cfg["Hq"], cfg["D"], device="cuda", dtype=dtype).requires_grad_()
    k = torch.randn(T, cfg["Hkv"], cfg["D"], device="cuda", dtype=dtype).requires_grad_()
    v = torch.randn(T, cfg["Hkv"], cfg["D"], device="cuda", dtype=dtype).requires_grad_()
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
    return q, k, v, cu


def check(name, fn, q, k, v, dout, gold, gold_grads) -> dict:
    out = fn()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    err = lambda a, b: ((a.float() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return {"out": err(out, gold), **{n: err(g, w) for n, g, w in zip(("dq", "dk", "dv"), grads, gold_grads)}}


def time_ms(fn, q, k, v, dout, reps: int, warmup: int) -> dict:
    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        torch.autograd.grad(fn(), (q, k, v), dout)

    res = {}
    for label, run in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
        for _ in range(warmup):
            run()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        res[label] = sorted(times)[len(times) // 2]
    return res


def visible_pairs(lens, window) -> int:
    """(query, key) pairs the mask keeps: the work every contender must do."""
    w = window or max(lens)
    return sum(n * (n + 1) // 2 - (n - w) * (n - w + 1) // 2 if n > w else n * (n + 1) // 2 for n in lens)


def run_config(cfg_name, args, gen) -> dict:
    cfg = CONFIGS[cfg_name]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    scale = cfg["D"] ** -0.5
    window, softcap = cfg["window"], cfg["softcap"]
    if args.doc_length:  # unpacked rows of one length: sdpa_per_doc is then plain causal SDPA per row
        lens = [args.doc_length] * max(1, args.tokens // args.doc_length)
    else:
        lens = doc_lengths(args.tokens, gen)
    check_lens = doc_lengths(args.check_tokens, gen, hi=args.check_tokens // 2)
    rec = {"config": cfg_name, **cfg, "dtype": args.dtype, "tokens": args.tokens, "doc_lengths": lens,
           "check_doc_lengths": check_lens, "contenders": {}}
    pairs = visible_pairs(lens, window)
    flops_fwd = 4 * pairs * cfg["Hq"] * cfg["D"]  # QK^T and PV; backward counted as 2.5x forward
    rec["visible_pairs"] = pairs
    cq, ck, cv, ccu = _inputs(check_lens, cfg, dtype, 1)
    cdout = torch.randn_like(cq)
    gq, gk, gv = (t.detach().float().requires_grad_() for t in (cq, ck, cv))
    gold = reference(gq, gk, gv, check_lens, scale, window, softcap)
    gold_grads = torch.autograd.grad(gold, (gq, gk, gv), cdout.float())
    gold = gold.detach()
    q, k, v, cu = _inputs(lens, cfg, dtype, 0)
    dout = torch.randn_like(q)
    names = [n for n in make_contenders(q, k, v, cu, lens, scale, window, softcap) if n not in args.skip]
    for name in names:
        entry: dict = {}
        try:
            small = make_contenders(cq, ck, cv, ccu, check_lens, scale, window, softcap)[name]()
            entry["max_rel_err_vs_fp32"] = check(name, small, cq, ck, cv, cdout, gold, gold_grads)
            fn = make_contenders(q, k, v, cu, lens, scale, window, softcap)[name]()
            entry.update(time_ms(fn, q, k, v, dout, args.reps, args.warmup))
            entry["fwd_tflops"] = flops_fwd / entry["fwd_ms"] / 1e9
            entry["fwd_bwd_tflops"] = 3.5 * flops_fwd / entry["fwd_bwd_ms"] / 1e9
            entry["peak_mem_gib"] = _peak_mem(fn, q, k, v, dout)
        except Exception as exc:  # noqa: BLE001 - an unavailable contender is recorded, not fatal
            entry = {"unavailable": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
            if not isinstance(exc, ImportError):
                entry["traceback"] = traceback.format_exc().splitlines()[-6:]
        finally:
            torch.cuda.empty_cache()
        rec["contenders"][name] = entry
        print(cfg_name, name, json.dumps({k_: v_ for k_, v_ in entry.items() if k_ != "traceback"}), flush=True)
    return rec


def _peak_mem(fn, q, k, v, dout) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(fn(), (q, k, v), dout)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--check-tokens", type=int, default=4096, help="tokens of the correctness-check batch")
    ap.add_argument("--configs", default="llama,gemma")
    ap.add_argument("--doc-length", type=int, default=0,
                    help="every document this long instead of the heavy-tailed mix (e.g. 2048 with --tokens 4096: "
                         "two plain causal rows, the unpacked training batch corept's attention also takes)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated contenders to leave out")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    env = environment()
    results = [run_config(c, args, gen) for c in args.configs.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = env.get("gpu", "gpu").lower().replace(" ", "-")
    path = out / f"attention-varlen-{env['date']}-{gpu}.json"
    path.write_text(json.dumps({"environment": env, "length_distribution":
                                "lognormal(ln 1024, 1.2) clipped to [64, 8192], remainder merged",
                                "results": results}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
