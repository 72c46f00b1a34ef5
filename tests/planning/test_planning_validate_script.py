"""bench/plan_validate.py without a GPU: its plan of runs, the bisection, the reports, a CPU dry run."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "plan_validate.py"


@pytest.fixture(scope="module")
def pv():
    spec = importlib.util.spec_from_file_location("plan_validate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**kw):
    base = dict(parts=["measure", "emulate", "search"], archs=["llama", "qwen3"], methods=["lora", "qlora"],
                seqs=[1024, 4096, 16384], steps=3, emulate_steps=5, probe_steps=1, max_probes=7, search_cap=131072,
                ckpt_dir="/tmp/x", device="cuda", tiny=False, emulate_gib=0.0)
    return argparse.Namespace(**{**base, **kw})


def test_default_plan_covers_the_issue(pv):
    from corept.planning import estimate, model_shape

    specs = pv._specs(_args())
    runs = [(s["arch"], s["method"], s["r"], r) for s in specs for r in s["runs"]]
    measured = [x for x in runs if x[3]["kind"] == "measure"]
    assert len(measured) == 12 and {(a, m) for a, m, _, _ in measured} == {
        (a, m) for a in ("llama", "qwen3") for m in ("lora", "qlora")}
    for arch, method, r, run in measured:  # under the 24 GB cap exactly when the planner says it fits
        est = estimate(model_shape(pv.model_config(arch, False)), method=method, seq=run["seq"], r=16, gpu="rtx3090")
        assert run["emulated"] == est.fits and (run["cap_bytes"] is not None) == est.fits
        assert run["cap_bytes"] in (None, int((23.70 - 0.5) * 2**30))  # a real 3090 minus its CUDA context
        assert run["steps"] == (5 if est.fits else 3) and run["predicted_gib"] > 5
    recs = [x for x in runs if x[3]["kind"] == "emulate-recommended"]
    assert len(recs) == 4 and all(x[3]["emulated"] and x[2] == 32 for x in recs)
    search = [s for s in specs if s.get("search")]
    assert len(search) == 1 and (search[0]["arch"], search[0]["method"], search[0]["r"]) == ("llama", "qlora", 32)
    s = search[0]["search"]
    assert 256 <= s["planner_seq"] <= s["raw_seq"] <= s["cap"] == 131072 and str(s["planner_seq"]) in s["predictions"]


@pytest.mark.parametrize("limit", [20_000, 97_000, 131_072, 60_000, 130_000])
def test_search_bisection_brackets_the_limit(pv, monkeypatch, limit):
    probes, out = [], []

    def fake_run(model, opt, run, spec, dev, gen):
        probes.append(run["seq"])
        ok = run["seq"] <= limit
        return {"kind": run["kind"], "config": {"seq": run["seq"]}, "ok": ok, "step_s": 1.0,
                **({} if ok else {"error": "OOM: fake"})}

    monkeypatch.setattr(pv, "_run_one", fake_run)
    spec = {"arch": "llama", "method": "qlora", "r": 32, "search": dict(
        planner_seq=90_112, raw_seq=100_096, cap=131_072, cap_bytes=1, probe_steps=1, max_probes=12, predictions={})}
    pv._search(None, None, spec, "cuda", None, out.append, deadline=float("inf"))
    final = out[-1]
    assert final["kind"] == "search" and len(probes) <= 12
    lo, hi = final["measured_max_seq"], final["first_oom_seq"]
    assert lo is not None and lo <= limit and lo % 256 == 0
    converged = hi is None and lo == 131_072 or hi is not None and hi > limit and (hi - lo) <= max(256, 0.03 * lo) + 256
    assert converged or len(probes) == 12
    assert converged or limit < 0.5 * 90_112  # only a planner far off may run out of probes
    assert final["within_15pct"] == (abs(90_112 - lo) <= 0.15 * lo)


def test_reports_and_merge(pv, tmp_path):
    report = pv._report()  # bench/plan_report.py
    rec = {"kind": "measure", "config": {"arch": "llama", "model": "Llama-3.1-8B", "method": "qlora", "seq": 4096,
                                         "batch": 1, "r": 16}, "predicted_gib": 6.7, "measured_gib": 6.5,
           "error_pct": 3.08, "ok": True, "gpu": "NVIDIA H200", "emulated": True, "planner_required_gib": 7.5}
    env = report.environment([rec], pv._commit())
    path = report.write([rec], env, str(tmp_path), "part-a")
    d = json.loads(Path(path).read_text())
    assert {"gpu", "versions", "command", "records"} <= set(d) and d["gpu"] == "NVIDIA H200"
    assert d["environment"]["commit"]  # the source commit (COMMIT file of a snapshot, else git HEAD)
    assert {"config", "predicted_gib", "measured_gib", "error_pct"} <= set(d["records"][0])
    other = dict(rec, kind="search", planner_seq=90_112, planner_raw_seq=100_096, measured_max_seq=95_000,
                 first_oom_seq=97_000, ratio=0.948, within_15pct=True)
    path_b = report.write([other], env, str(tmp_path), "part-b")
    merged = json.loads(Path(report.merge([path, path_b], str(tmp_path), "h200")).read_text())
    assert [r["kind"] for r in merged["records"]] == ["measure", "search"]
    md = (tmp_path / Path(report.merge([path, path_b], str(tmp_path), "h200")).with_suffix(".md").name).read_text()
    assert "| Llama-3.1-8B | qlora | 4096 | 1 | 16 | 6.7 | 6.5 | 3.08 |" in md
    assert "| search (QLoRA r 32; batch 1; 24 GB cap) | planner longest seq |" in md
    assert "| Llama-3.1-8B | 90112 | 95000 | 97000 | 0.948 | yes |" in md


def test_cpu_dry_run_end_to_end(tmp_path):
    """The real worker path (build, corept LoRA, steps, records) on tiny configs, in subprocesses."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-P", str(SCRIPT), "--out", str(out), "--device", "cpu", "--tiny",
                           "--archs", "llama", "--methods", "lora", "--seqs", "64", "--parts", "measure",
                           "--budget-s", "400", "--ckpt-dir", str(tmp_path / "ckpt")],
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", TRITON_INTERPRET="0"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out.glob("plan-*-cpu-measure-tiny.json"))
    assert files, proc.stdout[-2000:]
    records = json.loads(files[0].read_text())["records"]
    assert [(r["kind"], r["ok"], r["config"]["seq"]) for r in records] == [("measure", True, 64)]
    assert records[0]["loss_finite"] and records[0]["predicted_gib"] > 0
    assert "[measure] Llama-3.1-8B lora r16 seq 64" in proc.stdout
