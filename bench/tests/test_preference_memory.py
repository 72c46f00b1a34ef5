"""The DPO/KTO memory benchmark's CPU dry run works end to end with TRL (``make test`` runs it).

``bench/preference_memory.py --device cpu --tiny --no-interpret`` saves a tiny Llama checkpoint,
then runs hf, corept (``corept.load``) and hf_logits, each in its own subprocess, through TRL's
real DPOTrainer and KTOTrainer (1 warm-up + 2 steps each; ~30 s on a 2-core machine). corept's
kernels run as their torch twins here: the Triton interpreter would take ~35 s per corept step.
Nothing is timed; memory on CPU is process RSS and means nothing.
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
FIELDS = ("median_step_s", "tokens_per_s", "after_load_gib", "peak_gib", "activation_gib", "loss0", "loss")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefmem")
    cmd = [sys.executable, "-P", str(BENCH / "preference_memory.py"), "--device", "cpu", "--tiny", "--no-interpret",
           "--overlap", "--out", str(out)]  # --overlap: the next variant imports while one trains
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("prefmem-*-cpu-tiny.json"))
    assert len(files) == 1, (list(out.iterdir()), proc.stdout[-2000:])
    doc = json.loads(files[0].read_text())
    logs = {p.name: p.read_text()[-2000:] for p in (out / "logs").glob("*.log")}
    return doc, files[0].with_suffix(".md").read_text(), logs


def test_every_variant_and_method_ran_with_finite_numbers(dry_run):
    doc, _, logs = dry_run
    assert doc["versions"]["trl"] and doc["versions"]["torch"] and doc["command"] and doc["date"]
    recs = {(r["variant"], r["method"]): r for r in doc["records"]}
    assert set(recs) == {(v, m) for v in ("hf", "corept", "hf_logits") for m in ("dpo", "kto")}
    for (variant, method), r in recs.items():
        assert "error" not in r, (variant, method, r["error"], logs.get(Path(r.get("log", "")).name, ""))
        for key in FIELDS:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (variant, method, key, r[key])
        assert len(r["step_s"]) == r["warmup"] + r["steps"] and len(r["losses"]) == len(r["step_s"])
        assert r["rows_per_step"] == 4 and r["length"] == 64  # 2 pairs (chosen + rejected) or 4 rows
        assert r["reference"] == "adapter disabled" and r["fused_head_wrapper"]
        # step 1: the adapter is fresh (lora_B = 0), so the policy equals the reference
        assert abs(r["loss0"] - (math.log(2) if method == "dpo" else 0.5)) < 1e-4, (variant, method, r["losses"])


def test_paths_are_the_ones_documented(dry_run):
    doc, md, _ = dry_run
    recs = {(r["variant"], r["method"]): r for r in doc["records"]}
    for method in ("dpo", "kto"):
        hf, cp, full = recs[("hf", method)], recs[("corept", method)], recs[("hf_logits", method)]
        assert hf["logprob_head"] == cp["logprob_head"] == "trl_fused" and full["logprob_head"] == "full_logits"
        assert cp["loaded_with"] == "corept.load" and cp["ref_adapter_deleted"] is True
        assert cp["corept_applied"].get("lora") and cp["checkpointing_before"] == "corept"
        assert hf["trainable_params"] == cp["trainable_params"] == full["trainable_params"]
        # the full-logits head computes the same log-probs as TRL's fused head (same adapters, same data)
        for a, b in zip(hf["losses"], full["losses"]):
            assert abs(a - b) < 1e-4, (method, hf["losses"], full["losses"])
    assert "| dpo | 64 | 2 pairs | corept | trl_fused |" in md
    assert "| kto | 64 | 4 rows | hf_logits | full_logits |" in md
