"""Pinned host RAM as a constraint: the budget rule, detection, the search, estimate mode, the CLI."""
import json
import re

import pytest

from corept.cli import main
from corept.errors import InvalidOptionsError
from corept.planning import DoesNotFitError, estimate, host, model_shape, plan, recommend
from corept.planning.estimate import pinned_block
from corept.planning.gpus import GIB
from corept.planning.recommend import SEQ_STEP

LLAMA = "meta-llama/Llama-3.1-8B"
ISSUE = ["--model", LLAMA, "--vram", "24", "--method", "qlora", "--batch-size", "1"]


@pytest.fixture(scope="module")
def llama():
    return model_shape(LLAMA)


def run(capsys, *argv):
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_budget_rule_and_override():
    h = host.host_memory(8)
    assert (h.total, h.available, h.source) == (8 * GIB, 8 * GIB, "--host-ram")
    assert h.budget() == int(0.8 * 8 * GIB) - 4 * GIB  # min(available, 80% of total) - 4 GiB per process
    assert h.budget(2) == 0 and host.host_memory(64).budget(2) == int(0.8 * 64 * GIB) - 8 * GIB
    busy = host.HostMemory(64 * GIB, 20 * GIB, "detected", "test")
    assert busy.budget() == 16 * GIB  # what others use is left alone
    assert host.ram_for(h.budget()) == pytest.approx(8)
    for bad in (0, -1, "8", True):
        with pytest.raises(InvalidOptionsError, match="--host-ram must be a positive number of GiB"):
            host.host_memory(bad)


def test_detection(tmp_path, monkeypatch):
    monkeypatch.undo()  # drop conftest's fixed host: the real detection
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       32768000 kB\nMemFree:         1000000 kB\nMemAvailable:   30000000 kB\n")
    assert host._meminfo(str(info)) == (32768000 * 1024, 30000000 * 1024)
    info.write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 200 kB\n")  # no MemAvailable
    assert host._meminfo(str(info)) == (1000 * 1024, 310 * 1024)
    assert host._meminfo(str(tmp_path / "missing")) == (None, None)
    limit = tmp_path / "memory.max"
    limit.write_text("max\n")
    assert host._cgroup_limit([str(limit)]) is None
    limit.write_text(f"{8 * GIB}\n")
    assert host._cgroup_limit([str(tmp_path / "none"), str(limit)]) == 8 * GIB
    real = host.detect_host_memory()  # this machine: /proc/meminfo on Linux, else os.sysconf
    assert real.source == "detected" and real.total > 0 and 0 < real.available <= real.total
    monkeypatch.setattr(host, "_meminfo", lambda: (None, None))
    monkeypatch.setattr(host, "_cgroup_limit", lambda: 2 * GIB)
    fallback = host.detect_host_memory()
    assert fallback.how == "os.sysconf + cgroup limit" and fallback.total == 2 * GIB
    monkeypatch.setattr(host, "_sysconf", lambda: (None, None))
    unknown = host.detect_host_memory()
    assert unknown.source == "unknown" and unknown.budget() is None and "not checked" in unknown.describe()


def test_pinned_blocks_round_to_powers_of_two(llama):
    """torch's caching host allocator pins each offloaded layer input rounded up to a power of two."""
    assert [pinned_block(n) for n in (0, 1, 3, 4096, 4097)] == [0, 1, 4, 4096, 8192]
    a, H, L = 2, llama.hidden, llama.layers
    e = estimate(llama, method="qlora", seq=120576, gpu="h200")
    assert e.details["host_pinned_data"] == a * H * 120576 * L  # 29.44 GiB of data ...
    assert e.host_pinned == L * GIB  # ... in 32 blocks of 1 GiB
    assert estimate(llama, method="qlora", seq=32768, gpu="h200").host_pinned == 8 * GIB  # exact powers stay
    ddp = estimate(llama, method="qlora", seq=32768, gpu="h200", gpus=2, host=16)
    assert ddp.host_pinned_total == 16 * GIB and ddp.host_budget == int(0.8 * 16 * GIB) - 8 * GIB
    assert ddp.vram_fits and not ddp.host_fits and not ddp.fits


def test_search_never_recommends_more_pinned_ram_than_the_budget(llama):
    roomy = plan(llama, "qlora", vram=24, batch_size=1, host_ram=1024)
    assert roomy.recommendation["max_seq_length"] == 120576 and roomy.estimate.host_pinned == 32 * GIB
    p = plan(llama, "qlora", vram=24, batch_size=1, host_ram=8)
    e, budget = p.estimate, int(0.8 * 8 * GIB) - 4 * GIB
    assert p.fits and e.host_budget == budget and 0 < e.host_pinned <= budget
    assert p.recommendation["host_pinned_gib"] <= p.recommendation["host_budget_gib"] == round(budget / GIB, 2)
    longest = p.longest_seq_at_batch_1
    assert longest == e.seq and estimate(llama, method="qlora", seq=longest, r=e.r, gpu=e.gpu).host_pinned <= budget
    nxt = estimate(llama, method="qlora", seq=longest + SEQ_STEP, r=e.r, gpu=e.gpu, host=e.host)
    assert nxt.vram_fits and not nxt.host_fits  # the host, not VRAM, is the limit
    assert any("pinned host RAM limits this plan" in n and "120576" in n for n in e.notes)


def test_search_limits_the_batch_too(llama):
    p = plan(llama, "qlora", gpu="rtx3090", host_ram=8)  # seq 2048: 0.5 GiB pinned per sequence, budget 2.4
    assert (p.estimate.seq, p.estimate.batch) == (2048, 4) and p.recommendation["grad_accum"] == 4
    assert plan(llama, "qlora", gpu="rtx3090").estimate.batch == 16  # the fixed 256 GiB host: VRAM's choice
    with pytest.raises(DoesNotFitError, match=r"even with batch 1: it needs 16.00 GiB of pinned host RAM"):
        recommend(llama, "qlora", vram=24, max_seq_length=65536, host_ram=16)
    with pytest.raises(DoesNotFitError, match=r"even at seq 256, batch 8: it needs .* pinned host RAM") as info:
        plan(llama, "qlora", vram=24, batch_size=8, host_ram=4)
    assert any(s.startswith("--checkpointing standard") for s in info.value.suggestions)


def test_estimate_mode_reports_the_host_and_exits_1(capsys):
    rc, out, _ = run(capsys, *ISSUE, "--max-seq-length", "120576", "--host-ram", "16")
    assert rc == 1 and "required" in out and "FITS" in out  # VRAM fits ...
    line = next(x for x in out.splitlines() if x.startswith("pinned host RAM"))
    assert "DOES NOT FIT: needs 32.00 GiB of pinned host RAM, 8.80 GiB available for it" in line
    assert "(--host-ram)" in line and "verdict" in out and "DOES NOT FIT (pinned host RAM)" in out
    tail = out.split("would fit with (one change each, smallest first):")[1]
    assert "seq <= " in tail and "a machine with >= 45 GiB of free RAM" in tail
    rc, out, _ = run(capsys, *ISSUE, "--max-seq-length", "16384", "--host-ram", "6")
    assert rc == 1 and "--checkpointing standard (corept train --gradient-checkpointing true" in out
    rc, out, _ = run(capsys, *ISSUE, "--max-seq-length", "120576", "--host-ram", "16", "--json")
    d = json.loads(out)["estimate"]
    assert d["fits"] is False and d["vram_fits"] is True and d["host_fits"] is False
    assert d["host_ram"]["source"] == "--host-ram" and d["host_ram"]["budget_gib"] == pytest.approx(8.8)
    assert d["host_pinned_total_gib"] == 32.0


def test_recommend_mode_shows_the_budget_and_its_source(capsys):
    rc, out, _ = run(capsys, *ISSUE, "--json")
    d = json.loads(out)
    assert rc == 0 and d["estimate"]["host_ram"]["source"] == "detected"
    assert d["estimate"]["host_ram"]["budget_gib"] == pytest.approx(0.8 * 256 - 4)
    rc, out, _ = run(capsys, *ISSUE, "--host-ram", "8")
    assert rc == 0 and "recommended: max_seq_length" in out
    line = next(x for x in out.splitlines() if x.startswith("pinned host RAM"))
    assert "budget 2.4 GiB" in line and "(--host-ram)" in line and line.endswith("FITS")
    rc, out, _ = run(capsys, *ISSUE)
    assert "(detected, tests: a fixed 256 GiB machine)" in out


def test_help_says_method_is_required_and_sizes_are_gib(capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "(--method {lora,qlora,full} | --load-in-4bit)" in out and "[--method" not in out
    assert "required unless --load-in-4bit" in out and "--host-ram GIB" in out
    assert "GiB" in out and not re.search(r"\bGB\b", out)
    rc, out, _ = run(capsys, "--model", LLAMA, "--method", "qlora", "--gpu", "rtx3090")
    assert rc == 0 and not re.search(r"\bGB\b", out) and "NVIDIA GeForce RTX 3090 (23.7 GiB usable)" in out
    rc, _, err = run(capsys, "--model", LLAMA, "--gpu", "h100")  # the error for a missing method is kept
    assert rc == 2 and "--method is required" in err
