"""Host work of one training step, counted on the CPU: device launches per decoder layer.

At 2x2048 tokens the corept step on the H200 is host-bound: its GPU work is ~110 ms less than its
median step, and the profile counts ~7,200 launches per step (docs/benchmarks.md, second e2e run).
Every launch costs host time (one Triton launch with its Python measured 71 us a call on those
hosts, bench/results/lora-branch-probe-2026-11-29-h200-dequant4.jsonl), so the launch count is the
figure to bring down, and it can be counted without a GPU. This tool runs one training step
(forward, backward, AdamW) of the e2e harness's tiny model, set up exactly as the harness sets
up a variant (``bench/e2e_variants.setup``: bf16 weights, peft's fp32 adapters for corept, gradient
checkpointing), and counts what would be a device launch on CUDA:

* every aten op except views and bare allocations (a ``TorchDispatchMode``);
* every Triton launch (through the interpreter, so ``TRITON_INTERPRET=1`` must be set before
  anything imports Triton kernels); the ops the interpreter runs for itself are not counted;
* corept's fp32-output GEMM (``corept_kernels.lora.branch.mm_f32``) once, as the single cuBLAS call
  it is on CUDA (on CPU it upcasts operand chunks).

The forward and backward are counted; the AdamW step apart (its per-parameter ``.item()`` on CPU
step counters is host-only on CUDA). Per layer = count with ``L + 1`` decoder layers minus count
with ``L``, which cancels the embedding, loss and other per-step work. What differs from CUDA:
attention is PyTorch's CPU SDPA kernel (one op, as cuDNN's is one launch), and corept checkpointing's offload
copies are CPU copies. Checked against the H200: corept's Llama-3.1-8B 2x2048 profile counted
7,203 launches in a step; this count gave 181 per layer for the same code, 5,829 for 32 layers'
forward and backward (bench/results/launch-count-2026-11-29-cpu-before.json); the profile also holds
the optimizer's multi-tensor kernels, the offload copies and cuBLAS's split-K second kernels.

    TRITON_INTERPRET=1 PYTHONPATH=.build/all python3 -P bench/launch_count.py --out bench/results
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.util
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == HERE:
    sys.path.pop(0)  # bench/kernels.py must never shadow the `kernels` package

_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view",
              "_reshape_alias", "lift_fresh", "set_", "resize_", "is_same_size", "_has_compatible_shallow_copy_type",
              "promote_types", "result_type"}
"""aten ops that never launch a kernel (allocations, metadata, dtype arithmetic); views are told apart
by ``OpOverload.is_view``."""


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"corept_bench_{name}", os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class LaunchCounter:
    """Counts would-be device launches by name while active (a context manager)."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._quiet = 0
        self._stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def quiet(self, name: str):
        """Count ``name`` once; ops inside are not counted (they are one launch on CUDA)."""
        if self._quiet == 0:
            self.counts[name] += 1
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if counter._quiet == 0 and not func.is_view and name not in _NO_LAUNCH:
                    counter.counts[f"aten::{name}"] += 1
                return func(*args, **(kwargs or {}))

        self._stack.enter_context(_Mode())
        self._patch_triton()
        self._patch_mm_f32()
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def _swap(self, owner, attr: str, make):
        original = getattr(owner, attr)
        setattr(owner, attr, make(original))
        self._stack.callback(setattr, owner, attr, original)

    def _patch_triton(self):
        from triton.runtime.interpreter import InterpretedFunction

        def make(run):
            def counted(fn_self, *args, **kwargs):
                with self.quiet(f"triton::{getattr(fn_self.fn, '__name__', 'kernel')}"):
                    return run(fn_self, *args, **kwargs)
            return counted

        self._swap(InterpretedFunction, "run", make)

    def _patch_mm_f32(self):
        try:
            from corept_kernels.lora import branch as lora_branch
        except ImportError:
            return

        def make(mm_f32):
            def counted(a, b):
                with self.quiet("aten::mm (fp32 out)"):
                    return mm_f32(a, b)
            return counted

        self._swap(lora_branch, "mm_f32", make)


#: tokens per counted step: at least corept.lora.fast_path.SMALL_NO_GRAD_TOKENS, so checkpointing's
#: no-grad first pass takes the fused LoRA path as it does at training sizes
TOKENS = 128


def count_step(variant: str, layers: int, *, model: str = "tiny-llama", tokens: int = TOKENS, rank: int = 16,
               seed: int = 0) -> dict:
    """Launch counts of one AdamW training step of ``variant`` on ``model`` (a tiny model of
    ``bench/e2e_variants.MODELS``) cut or grown to ``layers`` layers."""
    import torch

    V = _sibling("e2e_variants")
    name = f"{model}-{layers}l"
    V.MODELS[name] = dict(V.MODELS[model], num_hidden_layers=layers)
    with tempfile.TemporaryDirectory() as folder:
        V.prepare(name, folder, seed, "cpu", "bf16")
        V.import_stack(variant)
        torch.manual_seed(seed)
        model, _, info = V.setup(variant, name, folder, device="cpu", dtype="bf16", max_seq=tokens, rank=rank,
                                 alpha=rank, seed=seed)
    # foreach, as AdamW runs on CUDA by default (on CPU it would default to one op chain per tensor)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    x = torch.randint(0, V.MODELS[name]["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(seed))

    def forward_backward():
        model(input_ids=x, labels=x).loss.backward()

    forward_backward()  # warm-up: lazy optimizer state, first-call caches
    opt.step()
    opt.zero_grad(set_to_none=True)
    with LaunchCounter() as c:
        forward_backward()
    with LaunchCounter() as c_opt:  # apart: AdamW's per-parameter .item() on its CPU step counters
        opt.step()                   # is a launch here but host-only on CUDA
        opt.zero_grad(set_to_none=True)
    return {"variant": variant, "layers": layers, "total": sum(c.counts.values()), "by_op": dict(c.counts),
            "optimizer": sum(c_opt.counts.values()), "corept_applied": info.get("corept_applied")}


def per_layer(variant: str, layers: int = 2, model: str = "tiny-llama", tokens: int = TOKENS) -> dict:
    """``count(layers + 1) - count(layers)``, in total and by op (ops whose count changes)."""
    a, b = (count_step(variant, n, model=model, tokens=tokens) for n in (layers, layers + 1))
    ops = sorted(set(a["by_op"]) | set(b["by_op"]))
    diff = {op: b["by_op"].get(op, 0) - a["by_op"].get(op, 0) for op in ops}
    diff = {op: n for op, n in sorted(diff.items(), key=lambda kv: -kv[1]) if n}
    triton = sum(n for op, n in diff.items() if op.startswith("triton::"))
    return {"variant": variant, "model": model, "per_layer": b["total"] - a["total"], "per_layer_triton": triton,
            "per_step_fixed": a["total"] - layers * (b["total"] - a["total"]), "optimizer": b["optimizer"],
            "per_layer_by_op": diff,
            "counted_at_layers": [layers, layers + 1], "corept_applied": a["corept_applied"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="corept,hf", help="e2e variants to count (CPU: hf, corept)")
    ap.add_argument("--models", default="tiny-llama,tiny-qwen3", help="tiny models of bench/e2e_variants.py")
    ap.add_argument("--out", help="folder for launch-count-<date>-cpu[-TAG].json")
    ap.add_argument("--tag", default="", help="suffix of the results file name (keeps an earlier file of the day)")
    ap.add_argument("--layers-8b", type=int, default=32, help="layers of the model to extrapolate to (Llama-3.1-8B: 32)")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 before running (corept's Triton kernels are counted through the interpreter)")
    import torch
    import transformers

    rows = []
    jobs = [(m.strip(), v.strip()) for m in a.models.split(",") if m.strip() for v in a.variants.split(",") if v.strip()]
    for m, v in jobs:
        r = per_layer(v, model=m)
        r["extrapolated_fwd_bwd"] = r["per_step_fixed"] + a.layers_8b * r["per_layer"]
        rows.append(r)
        print(f"{m:10} {v:8} {r['per_layer']:4d} launches per layer ({r['per_layer_triton']} Triton), "
              f"{r['per_step_fixed']} per step outside the layers; forward + backward of {a.layers_8b} layers: "
              f"{r['extrapolated_fwd_bwd']} (AdamW step apart: {r['optimizer']} here)")
        for op, n in list(r["per_layer_by_op"].items())[:12]:
            print(f"           {n:4d}  {op}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        tag = f"-{a.tag}" if a.tag else ""
        path = os.path.join(a.out, f"launch-count-{datetime.date.today().isoformat()}-cpu{tag}.json")
        meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                "transformers": transformers.__version__, "command": "python3 -P bench/launch_count.py " + " ".join(argv or sys.argv[1:]),
                "models": f"{a.models} (bench/e2e_variants.py), bf16, {TOKENS} tokens, LoRA r 16 on the 7 projections"}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
