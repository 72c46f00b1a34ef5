"""The GRPO memory benchmark's CPU dry run works end to end with TRL's GRPOTrainer.

``bench/grpo_memory.py --device cpu --tiny`` saves a tiny Llama checkpoint, then runs ``hf``
(``from_pretrained`` + ``peft_config`` + TRL's checkpointing) and ``corept`` (``corept.load`` +
``corept.get_peft_model``), each in its own subprocess, through TRL's real GRPOTrainer: a group of
8 completions of exactly 8 tokens for an 8-token prompt, 1 warm-up + 2 steps, then the generate()
timing (corept: patched, then unpatched). ~30 s on a 2-core machine; corept's kernels run as their
torch twins. Nothing is timed for real here and memory on CPU is process RSS: the test checks the
plumbing (records, fields, the markdown), not the numbers.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
FIELDS = ("after_load_gib", "peak_gib", "activation_gib", "median_step_s", "median_gen_s", "median_train_s",
          "sampled_tok_s", "loss0", "loss")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpomem")
    cmd = [sys.executable, "-P", str(BENCH / "grpo_memory.py"), "--device", "cpu", "--tiny", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("grpomem-*-cpu-tiny.json"))
    assert len(files) == 1, (list(out.iterdir()), proc.stdout[-2000:])
    records = json.loads(files[0].read_text())
    logs = {p.name: p.read_text()[-2000:] for p in (out / "logs").glob("*.log")}
    return records, files[0].with_suffix(".md").read_text(), logs


def test_both_variants_trained_with_finite_numbers(dry_run):
    records, _, logs = dry_run
    runs = {r["variant"]: r for r in records if r.get("kind") == "grpo"}
    assert set(runs) == {"hf", "corept"}
    for v, r in runs.items():
        assert "error" not in r, (v, r["error"], logs.get(Path(r.get("log", "")).name, ""))
        assert r["done"] and r["versions"]["trl"] and r["versions"]["torch"] and r["command"] and r["date"]
        for key in FIELDS:
            assert _finite(r[key]), (v, key, r[key])
        n = r["warmup"] + r["steps"]
        assert len(r["step_s"]) == len(r["gen_s"]) == len(r["gen_peak_gib"]) == len(r["train_peak_gib"]) == n
        assert len(r["losses"]) == n and all(_finite(x) for x in r["losses"])
        assert all(_finite(g) and g > 0 for g in r["grad_norms"]), r["grad_norms"]  # the reward varies
        assert r["completion_lengths"] == [8] and r["prompt_tokens_tokenized"] == 8  # every completion exactly L
        assert r["peak_phase"] in ("generation", "training") and r["loss_type"] and r["fused_head_wrapper"]
    hf, cp = runs["hf"], runs["corept"]
    assert hf["trainable_params"] == cp["trainable_params"] > 0
    assert hf["checkpointing_after"].startswith("transformers") and cp["checkpointing_after"] == "corept"
    assert cp["loaded_with"].startswith("corept.load") and cp["corept_applied"].get("lora")


def test_generate_speed_patched_and_unpatched(dry_run):
    records, _, _ = dry_run
    runs = {r["variant"]: r for r in records if r.get("kind") == "grpo"}
    g_hf, g_cp = runs["hf"]["generate"], runs["corept"]["generate"]
    assert g_hf["batch"] == 8 and g_hf["new_tokens"] == 8 and _finite(g_hf["peft_tok_s"]) and g_hf["peft_tok_s"] > 0
    for key in ("patched_tok_s", "unpatched_tok_s", "speedup"):
        assert _finite(g_cp[key]) and g_cp[key] > 0, (key, g_cp)
    assert g_cp["unpatched_forwards_left"] == 0  # corept.unpatch undid every forward (trl_head_scope restored TRL's)
    assert g_cp["greedy_rows_identical"] == 8  # fp32 torch twins: the same greedy tokens


def test_markdown_written(dry_run):
    _, md, _ = dry_run
    assert "Workload: per step one prompt of 8 tokens, a group of 8 completions of exactly 8 tokens" in md
    assert "| hf | tiny-llama | 8 |" in md and "| corept | tiny-llama | 8 |" in md
    assert "generate() speed" in md and "| corept | 8 × 8 (8) |" in md
