"""The end-to-end benchmark harness never rots: its CPU smoke mode runs in ``make test``.

``bench/e2e.py --smoke`` runs the real code paths (prepare step, one subprocess per run, the hf and
corept stacks on tiny llama and qwen3 models in fp32) and writes the results files; this checks
their fields and that hf and corept losses agree. Nothing here is timed. The search, the site
linker and the report are checked directly (standard library, no subprocess; modules loaded by the
``bench_module`` fixture of conftest.py).
"""
from __future__ import annotations

import importlib.metadata
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
REQUIRED = ("variant", "model", "shape", "tokens_per_s", "median_step_s", "peak_gib", "after_load_gib",
            "activation_gib", "loss", "losses", "versions", "command", "date")
NUMBERS = ("tokens_per_s", "median_step_s", "peak_gib", "after_load_gib", "activation_gib", "loss")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e-smoke")
    proc = subprocess.run([sys.executable, "-P", str(BENCH / "e2e.py"), "--smoke", "--profile", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, env=TWINS, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("e2e-*-cpu-smoke.json"))
    assert len(files) == 1, (list(out.iterdir()), proc.stdout[-2000:])
    assert files[0].with_suffix(".md").is_file()
    records = json.loads(files[0].read_text())
    assert "Profiled step" in files[0].with_suffix(".md").read_text()
    logs = {p.name: p.read_text()[-2000:] for p in (out / "logs").glob("*.log")}
    return [r for r in records if r.get("kind") == "throughput"], logs


def test_smoke_records_have_the_fields_and_finite_numbers(smoke):
    records, logs = smoke
    assert {(r["variant"], r["model"]) for r in records} == {
        (v, m) for v in ("hf", "corept") for m in ("tiny-llama", "tiny-qwen3")}
    for r in records:
        assert "error" not in r, (r["error"], logs.get(os.path.basename(r.get("log", "")), ""))
        for key in REQUIRED:
            assert key in r, key
        for key in NUMBERS:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r[key])
        assert r["tokens_per_s"] > 0 and r["median_step_s"] > 0
        assert len(r["losses"]) == r["warmup"] + r["steps"] and all(math.isfinite(x) for x in r["losses"])
        n = r["warmup"] + r["steps"]  # per step: the host's issue time (wall, CPU); allocator events (CUDA only)
        assert len(r["issue_s"]) == len(r["issue_cpu_s"]) == n
        assert all(0 < i <= s + 1e-3 for i, s in zip(r["issue_s"], r["step_s"])) and all(c > 0 for c in r["issue_cpu_s"])
        assert r["step_alloc_events"] == [{}] * n
        assert r["versions"]["torch"] and r["versions"]["transformers"] and r["versions"]["peft"]
        assert "gpu" in r and r["shape"] == "2x64"
        prof = r["profile"]  # --profile: one extra step, not among the timed ones
        assert len(r["losses"]) == r["warmup"] + r["steps"]
        assert prof["busy_ms"] > 0 and prof["wall_ms"] > 0 and prof["timer"] == "cpu ops (self time)"
        assert prof["by_category_ms"].get("gemm", 0) > 0 and len(prof["top"]) > 3
        assert prof["launches"] > sum(t["calls"] for t in prof["top"][:3])  # every op counted, not the top only
        assert abs(sum(prof["by_category_ms"].values()) - prof["busy_ms"]) < 1e-2 * prof["busy_ms"] + 0.01
        if r["variant"] == "corept" and not os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
            assert r["cuda_alloc_conf"] == "expandable_segments:True"  # as `corept train` runs


def test_smoke_hf_and_corept_losses_agree(smoke):
    records, _ = smoke
    by = {(r["variant"], r["model"]): r for r in records}
    for model in ("tiny-llama", "tiny-qwen3"):
        hf, cp = by[("hf", model)], by[("corept", model)]
        assert hf["trainable_params"] == cp["trainable_params"]
        for a, b in zip(hf["losses"], cp["losses"]):
            assert abs(a - b) < 1e-3, (model, hf["losses"], cp["losses"])
        assert cp["corept_applied"], "corept patched nothing"


def test_search_finds_the_threshold(bench_module):
    ms = bench_module("e2e_maxseq")
    for limit, start in ((9300, 8192), (71_700, 8192), (3000, 8192), (500, 1024)):
        seen = []
        res = ms.search(lambda s: seen.append(s) or s <= limit, start, 262_144, 1024)
        expect = (limit // 1024) * 1024 or None
        assert res["max_seq"] == expect and res["complete"], (limit, res)
        assert res["first_fail"] is None or res["first_fail"] - (expect or 0) <= 1024
        assert len(seen) == len(set(seen)) <= 12
    assert ms.search(lambda s: True, 8192, 20_000, 1024)["max_seq"] == 19_456  # the cap, no fail
    stopped = ms.search(lambda s: None if s > 16_384 else True, 8192, 262_144, 1024)
    assert stopped["max_seq"] == 16_384 and not stopped["complete"]
    clock = iter(range(100)).__next__
    late = ms.search(lambda s: True, 8192, 262_144, 1024, deadline=2, clock=clock)
    assert late["max_seq"] == 16_384 and not late["complete"]
    assert ms.per_variant("8192,unsloth_qlora=65536", ["hf_qlora", "unsloth_qlora"]) == {
        "hf_qlora": 8192, "unsloth_qlora": 65536}


def test_link_site_exposes_the_plugins(tmp_path, bench_module):
    site = bench_module("e2e_site")
    names = site.link_site(str(tmp_path), str(REPO), (".", "kernels", "plugins/llama", "plugins/qwen"))
    assert names == ["corept", "corept-kernels", "corept-llama", "corept-qwen"]
    eps = {ep.name: ep.value for d in importlib.metadata.distributions(path=[str(tmp_path)])
           for ep in d.entry_points if ep.group == "corept"}
    assert eps == {"llama": "corept_llama:plugin", "qwen": "corept_qwen:plugin"}
    assert (tmp_path / "corept" / "__init__.py").is_file() and (tmp_path / "corept_kernels").is_dir()
    again = site.link_site(str(tmp_path), str(REPO), (".", "kernels"))  # a warm machine's second call
    assert again == ["corept", "corept-kernels"]
    assert len([d for d in importlib.metadata.distributions(path=[str(tmp_path)]) if d.name == "corept"]) == 1


def test_report_merges_and_tabulates(tmp_path, bench_module):
    rep = bench_module("e2e_report")
    a = [{"kind": "throughput", "variant": "hf", "model": "m", "shape": "1x8", "tokens_per_s": 100.0, "loss": 2.0},
         {"kind": "throughput", "variant": "unsloth", "model": "m", "shape": "1x8", "error": "boom"}]
    b = [{"kind": "throughput", "variant": "unsloth", "model": "m", "shape": "1x8", "tokens_per_s": 200.0,
          "loss": 2.001},
         {"kind": "maxseq", "variant": "hf_qlora", "model": "m", "max_seq": 9216, "probes": [{"seq": 8192, "ok": True}]}]
    for name, recs in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(recs))
    (tmp_path / "c.json").write_text(json.dumps([dict(b[0], error="skipped", tokens_per_s=None)]))
    merged = rep.merge([str(tmp_path / f"{n}.json") for n in "abc"])
    assert len(merged) == 3 and "error" not in merged[1]
    text = rep.markdown(merged)
    assert "| unsloth | m | 1x8 | 200 | 2.00 | 1.00 |" in text and "9,216" in text


def test_report_header_names_each_package_from_the_runs_that_have_it(bench_module):
    rep = bench_module("e2e_report")
    recs = [{"kind": "throughput", "variant": "hf", "model": "m", "shape": "1x8", "tokens_per_s": 1.0,
             "versions": {"torch": "2.11.0", "unsloth": None}},
            {"kind": "throughput", "variant": "unsloth", "model": "m", "shape": "1x8", "tokens_per_s": 2.0,
             "versions": {"torch": "2.11.0", "unsloth": "2026.10.9"}}]
    head = rep.markdown(recs).splitlines()[0]
    assert "unsloth 2026.10.9" in head and "None" not in head and "torch 2.11.0" in head


def test_profile_categories(bench_module):
    prof = bench_module("e2e_profile")
    assert prof.category("flash_fwd_kernel") == "attention"
    assert prof.category("nvjet_tst_128x256_64x4") == "gemm" and prof.category("aten::mm") == "gemm"
    assert prof.category("Memcpy DtoH (Device -> Pinned)") == "copy_cast"
    assert prof.category("_rms_norm_fwd") == "norm" and prof.category("_rope_kernel") == "rope"
    assert prof.category("something_new") == "other"


def test_host_profile_names_the_functions_that_took_the_time(bench_module):
    prof = bench_module("e2e_profile")

    def busy_python_loop():
        return sum(i * i for i in range(200_000))

    synced = []
    out = prof.host_profiled_step(busy_python_loop, lambda: synced.append(1), top=5)
    assert len(synced) == 2 and out["wall_ms"] > 0 and len(out["top_self"]) <= 5
    names = [r["func"] for r in out["top_cum"]]
    assert any("busy_python_loop" in n for n in names), names
    assert all(r["self_ms"] <= r["cum_ms"] + 1e-6 for r in out["top_self"])


def test_budget_runs_what_fits_and_skips_the_rest(tmp_path, bench_module):
    """A run starts when its estimate (first run: per process + per shape; later: the stack's
    measured seconds per shape) fits the call's remaining budget, else it is recorded as skipped."""
    e2e = bench_module("e2e")
    args = e2e.build_parser().parse_args(["--out", str(tmp_path), "--budget-s", "1000", "--run-timeout", "420",
                                          "--work-dir", str(tmp_path / "w"), "--models", "llama-3.1-8b"])
    d = e2e.Driver(args)
    started = []
    d.train = lambda name, variant, model, shapes: started.append((variant, len(shapes))) or [{"variant": variant}]
    two = [[2, 2048], [1, 8192]]
    d.remaining = lambda: 145.0
    assert d._run("llama-3.1-8b", "unsloth", two, {"llama-3.1-8b"}) == [{"variant": "unsloth"}]
    d.remaining = lambda: 135.0  # below Unsloth's first-run estimate for two shapes (140 s)
    skipped = d._run("llama-3.1-8b", "unsloth", two, {"llama-3.1-8b"})
    assert [r["skipped"] for r in skipped] == [True, True] and "140s needed" in skipped[0]["error"]
    d.durations["unsloth"] = 60.0  # a measured run: 60 s per shape
    assert d._run("llama-3.1-8b", "unsloth", two, {"llama-3.1-8b"}) == [{"variant": "unsloth"}]
    assert started == [("unsloth", 2), ("unsloth", 2)]
    assert e2e.estimate_s("base", 1) < e2e.estimate_s("corept", 1) < e2e.estimate_s("unsloth", 1)


def test_profile_can_name_the_variants_it_profiles(tmp_path, bench_module):
    """``--profile`` alone profiles every run; ``--profile corept,corept_qlora`` only those."""
    e2e = bench_module("e2e")
    base = ["--out", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--ckpt-dir", str(tmp_path / "ck"),
            "--run-timeout", "60", "--budget-s", "100"]
    every = e2e.Driver(e2e.build_parser().parse_args(base + ["--profile"]))
    assert every.profiles("hf") and every.profiles("corept")
    some = e2e.Driver(e2e.build_parser().parse_args(base + ["--profile", "corept,corept_qlora"]))
    assert some.profiles("corept_qlora") and not some.profiles("unsloth")
    assert not e2e.Driver(e2e.build_parser().parse_args(base)).profiles("corept")
    specs = []
    some.spawn = lambda name, spec, stack, timeout: specs.append(spec) or {"rc": 0, "timed_out": False,
                                                                           "wall_s": 1.0, "log": "x", "tail": ""}
    some.train("a", "corept", "tiny-llama", [[1, 8]])
    some.train("b", "hf", "tiny-llama", [[1, 8]])
    assert [s["profile"] for s in specs] == [True, False]
    with pytest.raises(SystemExit, match="unknown name"):
        e2e.main(base + ["--profile", "corept,nope", "--dry-run"])
