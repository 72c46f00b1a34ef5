"""GGUF quantizer speed on an 8B-shaped model (Llama-3.1-8B sizes, random weights).

Two measurements, written to one JSON results file:

* ``layers``: each quantizer (Q8_0, Q4_K, Q5_K, Q6_K) on one decoder layer's seven matrices
  (218M values) on ``--device``, median of ``--repeats`` runs, and that time scaled to the whole
  model (32 layers plus embedding and head: 8.03B values);
* ``export`` (``--export``, CUDA only): the whole public path, ``corept.save(model, None, dir,
  method="gguf", quantization=...)`` on a Llama-3.1-8B-shaped model built with random bf16 weights on
  the GPU: merge, layout, quantize on the GPU, write the file; wall seconds and file size per mix.

Usage: ``python bench/gguf_export.py --device cuda --export q4_k_m q8_0 --out bench/results/x.json``
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import environment  # noqa: E402
from corept.export.gguf.quants import QUANTIZERS  # noqa: E402

HIDDEN, FFN, KV, VOCAB, LAYERS = 4096, 14336, 1024, 128256, 32
LAYER_SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (FFN, HIDDEN), (FFN, HIDDEN),
                (HIDDEN, FFN)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_layers(device: str, repeats: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    mats = [torch.randn(s, generator=gen, device=device) * 0.02 for s in LAYER_SHAPES]
    per_layer = sum(m.numel() for m in mats)
    total = per_layer * LAYERS + 2 * VOCAB * HIDDEN
    out = {"values_per_layer": per_layer, "model_values": total}
    for name, fn in QUANTIZERS.items():
        times = []
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            for m in mats:
                fn(m)
            _sync(device)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        out[name] = {"layer_seconds": round(med, 4), "model_seconds_scaled": round(med * total / per_layer, 1),
                     "values_per_second": round(per_layer / med)}
        print(name, out[name], flush=True)
    return out


def time_export(mixes: list[str]) -> dict:
    import corept
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=VOCAB, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192},
                         tie_word_embeddings=False)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out = {"model": "Llama-3.1-8B shape, random bf16 weights on the GPU", "parameters": sum(p.numel() for p in model.parameters())}
    for mix in mixes:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
            torch.cuda.synchronize()
            t = time.perf_counter()
            path = corept.save(model, None, d, method="gguf", quantization=mix)
            seconds = time.perf_counter() - t
            out[mix] = {"seconds": round(seconds, 1), "file_gib": round(path.stat().st_size / 2**30, 2)}
        print(mix, out[mix], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--export", nargs="*", default=[])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result = {"env": environment(), "device": args.device, "cpu_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "layers": time_layers(args.device, args.repeats)}
    if args.export:
        result["export"] = time_export(args.export)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
