"""The packing benchmark's CPU smoke runs end to end through TRL's SFTTrainer (``make test`` runs it).

``bench/packing.py --smoke`` saves a tiny Llama checkpoint (the e2e bench's prepare step), then
trains corept and hf, packed and padded, one epoch over the same seeded documents: one process
per stack (``--group-stacks``, the smoke's default), corept's kernels as their torch twins.
This checks the results file's fields, that every run's real tokens add up to the dataset's (and
to TRL's own count), that packed rows carry no padding and padded ones do, and that corept and hf
log the same loss at every step. Nothing is timed. The pieces the driver computes without a
subprocess (length mix, batch plan, budget, report) are checked directly.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
TWINS = dict(os.environ, TRITON_INTERPRET="0")  # the harness is under test, not the kernels
VARIANTS = {"corept_packed", "hf_packed", "corept_padded", "hf_padded"}
NUMBERS = ("real_tokens_per_s", "mean_real_tokens_per_s", "median_step_s", "spread", "step_cv", "pad_fraction",
           "peak_gib", "after_load_gib", "activation_gib", "loss0", "loss")
PER_STEP = ("step_s", "real_tokens", "positions", "label_tokens", "docs", "micro_batches", "losses")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("packing-smoke")
    proc = subprocess.run([sys.executable, "-P", str(BENCH / "packing.py"), "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, env=TWINS, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("packing-*-cpu-smoke.json"))
    assert len(files) == 1, (list(out.iterdir()), proc.stdout[-2000:])
    records = [r for r in json.loads(files[0].read_text()) if r.get("kind") == "packing"]
    logs = {p.name: p.read_text()[-2000:] for p in (out / "logs").glob("*.log")}
    return {r["variant"]: r for r in records}, files[0].with_suffix(".md").read_text(), logs


def test_records_have_the_fields(smoke):
    recs, _, logs = smoke
    assert set(recs) == VARIANTS
    for v, r in recs.items():
        assert "error" not in r, (v, r["error"], logs.get(os.path.basename(r.get("log", "")), ""))
        for key in NUMBERS:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (v, key, r[key])
        assert r["real_tokens_per_s"] > 0 and r["median_step_s"] > 0 and r["spread"] >= 1
        assert len({len(r[k]) for k in PER_STEP}) == 1 and len(r["step_s"]) == r["steps_done"], v
        assert r["timed_steps"] == r["steps_done"] - r["warmup"] > 0
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["versions"]["torch"] and r["versions"]["trl"] and r["versions"]["datasets"] and r["versions"]["peft"]
        assert "gpu" in r and r["command"].startswith("python3 -P bench/packing.py") and r["date"]
        mix = r["length_mix"]
        assert {"mean", "median", "p90", "p99", "max", "docs", "tokens", "params"} <= set(mix)
        assert mix["max"] <= mix["params"]["high"] <= r["tokens_per_step"] == r["max_length"]


def test_real_tokens_add_up_to_the_dataset(smoke):
    recs, _, _ = smoke
    for v, r in recs.items():
        assert sum(r["real_tokens"]) == r["real_tokens_total"] == r["dataset_tokens"] == r["length_mix"]["tokens"], v
        assert r["trl_num_tokens"] == r["dataset_tokens"], v  # TRL's own count agrees
        assert sum(r["docs"]) == r["dataset_docs"] == r["length_mix"]["docs"], v  # BFD cut no document
        if r["batching"] == "packed":
            assert r["batching_in_use"] == "packed (bfd)" and (r["batch"], r["grad_accum"]) == (1, 1)
            assert r["positions"] == r["real_tokens"] and r["pad_fraction"] == 0
            assert all(n <= r["tokens_per_step"] for n in r["real_tokens"])
            # the padding-free collator masks each document's first label (no cross-document target)
            assert [t - d for t, d in zip(r["real_tokens"], r["docs"])] == r["label_tokens"]
        else:
            assert r["batching_in_use"] == "padded" and r["batch"] == 4 and r["grad_accum"] >= 1
            assert r["pad_fraction"] > 0 and r["label_tokens"] == r["real_tokens"]
            assert all(1 <= m <= r["grad_accum"] for m in r["micro_batches"])


def test_corept_and_hf_agree_step_by_step(smoke):
    recs, md, _ = smoke
    for batching in ("packed", "padded"):
        hf, cp = recs[f"hf_{batching}"], recs[f"corept_{batching}"]
        assert hf["trainable_params"] == cp["trainable_params"] and cp["corept_applied"]
        assert hf["real_tokens"] == cp["real_tokens"]  # the same rows in the same order
        for a, b in zip(hf["losses"], cp["losses"]):
            assert abs(a - b) < 1e-3, (batching, hf["losses"], cp["losses"])
    assert "| corept_packed | tiny-llama | packed (bfd) | 1 × 1 |" in md and "within 100-1,000 tokens" in md
    assert "| hf_padded | tiny-llama | padded | 4 × " in md and "Loss per optimizer step" in md


def test_length_mix_is_seeded_clipped_and_heavy_tailed(bench_module):
    data = bench_module("packing_data")
    a = data.lengths(200_000, 0, **data.GPU_MIX)
    assert a == data.lengths(200_000, 0, **data.GPU_MIX) and a != data.lengths(200_000, 1, **data.GPU_MIX)
    s = data.summary(a)
    assert s["tokens"] >= 200_000 and 32 <= s["min"] and s["max"] <= 8192
    assert s["share_100_to_1000"] > 0.6 and s["share_over_2048"] > 0.02 and s["mean"] > s["median"]
    ids = data.token_ids([5, 7], vocab=10, avoid={0, 1, 9}, seed=3)
    assert [len(x) for x in ids] == [5, 7] and not {0, 1, 9} & set(ids[0] + ids[1])


def test_batch_plan_and_budget(tmp_path, bench_module):
    pk = bench_module("packing")
    assert pk.batch_plan(650.0, 16384, 8) == {"packed": (1, 1), "padded": (8, 3), "unsloth_default": (8, 3)}
    assert pk.batch_plan(5000.0, 16384, 8)["padded"] == (8, 1)
    args = pk.parse(["--out", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--ckpt-dir", str(tmp_path / "ck"),
                     "--budget-s", "100"])
    d = pk.PackingDriver(args)
    d.remaining = lambda: 45.0  # below Unsloth's first-run estimate (90 s)
    d.spawn = lambda *a, **k: pytest.fail("no process may start")
    skipped = d.run("llama-3.1-8b", ["unsloth"], {"llama-3.1-8b"})
    assert skipped[0]["skipped"] and "needed" in skipped[0]["error"] and skipped[0]["grad_accum"] == 3
    assert d.run("qwen3-8b", ["hf_packed"], set())[0]["error"].startswith("checkpoint missing")


def test_report_ratios_and_merge(tmp_path, bench_module):
    pk = bench_module("packing")
    mix = {"distribution": "d", "params": {"median": 1, "sigma": 1, "low": 1, "high": 9}, "seed": 0, "docs": 2,
           "tokens": 9, "mean": 4.5, "median": 4, "p90": 5, "p99": 5, "max": 5, "min": 4, "share_100_to_1000": 0,
           "share_over_2048": 0}
    rec = dict(kind="packing", model="m", batch=1, grad_accum=1, losses=[2.0, 1.5], loss0=2.0, loss=1.5, length_mix=mix)
    recs = [dict(rec, variant="hf_packed", real_tokens_per_s=100.0), dict(rec, variant="unsloth", real_tokens_per_s=50.0),
            dict(rec, variant="corept_packed", real_tokens_per_s=150.0),
            dict(rec, variant="corept_qlora_packed", real_tokens_per_s=80.0),
            dict(rec, variant="hf_qlora_packed", real_tokens_per_s=40.0)]
    md = pk.markdown(recs)
    assert "| corept_packed | m | – | 1 × 1 | – | 150 | 1.50 | 3.00 |" in md
    assert "| corept_qlora_packed | m | – | 1 × 1 | – | 80 | 2.00 | – |" in md  # QLoRA against QLoRA peers
    assert "| hf_packed | m | 2.0000 1.5000 |" in md
    path = tmp_path / "a.json"
    path.write_text(json.dumps(recs + [dict(recs[0], error="skipped", real_tokens_per_s=None, shape=None)]))
    merged = pk.REP.merge([str(path)])
    assert len(merged) == 5 and merged[0]["real_tokens_per_s"] == 100.0  # a failed rerun never replaces a result
    jpath, mpath = pk.write(merged, str(tmp_path), "t")
    assert Path(jpath).name.startswith("packing-") and "| hf_packed | m |" in Path(mpath).read_text()
