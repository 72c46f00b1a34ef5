"""The multi-GPU benchmark never rots: its CPU dry run (gloo, tiny model) runs in ``make test``.

``bench/multigpu.py --dry-run`` runs the real code paths of the single / DDP / FSDP2 parts (one
``torchrun`` each, the FSDP2 model built on the meta device and materialized shard by shard) and
writes the results files; this checks their fields. Nothing here is timed. ~30 s.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent
# the smoke run checks the harness, not the kernels: their torch twins, not the slow Triton interpreter
TWINS = dict(os.environ, TRITON_INTERPRET="0")
REPO = BENCH.parent


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("multigpu-dry")
    proc = subprocess.run([sys.executable, "-P", str(BENCH / "multigpu.py"), "--dry-run", "--parts", "single,ddp,fsdp",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, env=TWINS, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("multigpu-*-cpu-dry.json"))
    assert len(files) == 1, list(out.iterdir())
    assert files[0].with_suffix(".md").is_file()
    return json.loads(files[0].read_text())


def test_every_part_trained_with_finite_losses(doc):
    by = {r["part"]: r for r in doc["records"]}
    assert list(by) == ["single", "ddp", "fsdp"]
    for part, r in by.items():
        assert "error" not in r, (part, r.get("error"), r.get("log_tail"))
        assert r["gpus"] == (1 if part == "single" else 2)
        assert len(r["losses"]) == r["warmup"] + r["steps"] and all(math.isfinite(x) for x in r["losses"])
        assert len(r["peak_gib_per_rank"]) == r["gpus"] and r["tokens_per_s"] > 0
        assert r["versions"]["torch"] and r["date"] and r["command"].startswith("python3 -P bench/multigpu.py")
        assert r["predicted_peak_gib"] > 0 and "lora" in r["corept_applied"]
    assert by["fsdp"]["trainable_params"] == by["single"]["trainable_params"]  # global count of the shards
    assert set(doc["summary"]) >= {"ddp_speedup", "fsdp_finite_loss"}


def test_markdown_reports_skips_and_errors(bench_module):
    md = bench_module("multigpu").markdown({"date": "2026-01-01", "tag": "t", "command": "c", "summary": {
        "ddp_speedup": 1.9, "ddp_target": 1.85, "ddp_meets_target": True}, "records": [
        {"part": "single", "engine": "single", "gpus": 1, "model": "m", "batch": 2, "seq": 8, "tokens_per_s": 10.0,
         "peak_gib_per_rank": [1.0], "loss0": 2.0, "loss": 1.0, "versions": {"torch": "x"}, "gpu": "G"},
        {"part": "fsdp", "skipped": "budget"},
        {"part": "ddp", "engine": "ddp", "gpus": 2, "model": "m", "error": "OutOfMemoryError: boom"}]})
    assert "| single | single | 1 | m | 16 | 10 | 1.00 |" in md
    assert "skipped: budget" in md and "OutOfMemoryError: boom" in md and "**1.90x** (target 1.85x: met)" in md
