"""CPU thread choice on a shared machine: start with the idle cores, re-measure during training."""
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from corept.training import cpu


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "_cores", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    torch.set_num_threads(2)
    yield


def test_initial_threads_follow_other_processes(two_cores, monkeypatch):
    monkeypatch.setattr(cpu, "busy_cores", lambda seconds=0.5: 0.3)
    assert cpu.initial_threads() is None and torch.get_num_threads() == 2  # idle machine: keep both
    monkeypatch.setattr(cpu, "busy_cores", lambda seconds=0.5: 1.2)
    note = cpu.initial_threads()
    assert torch.get_num_threads() == 1 and "keep 1.2 of 2 cores busy, so 1 torch thread(s)" in note
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu.initial_threads() is None and torch.get_num_threads() == 2  # the user's choice wins


def test_governor_subtracts_its_own_cpu_time(two_cores, monkeypatch):
    """Machine 2.0 cores busy of which this process used 2.0: nobody else, keep 2 threads; then
    another process takes a core: 1 thread; then it leaves: back to 2 (never above the ceiling)."""
    samples = iter([(0, 0, 0.0, 0.0),  # idle jiffies, total jiffies, own cpu s, wall s
                    (0, 200, 2.0, 1.0),  # 200 busy jiffies of 200: 2 cores busy, 2.0 s of it ours
                    (0, 400, 3.0, 2.0),  # 2 cores busy, 1.0 s ours -> 1 core is someone else's
                    (200, 800, 4.0, 4.0)])  # 1 core busy over 2 s, 1.0 s ours -> 0.5 others -> 2
    gov = cpu.ThreadGovernor(ceiling=2, every=5)
    monkeypatch.setattr(gov, "_sample", lambda: next(samples))
    state = SimpleNamespace(global_step=0)
    gov.on_train_begin(None, state, None)
    for step, threads in ((5, 2), (10, 1), (12, 1), (15, 2)):
        state.global_step = step
        gov.on_step_end(None, state, None)
        assert torch.get_num_threads() == threads, step
    assert gov.changes == [(10, 1), (15, 2)]


def test_busy_cores_sees_a_busy_process():
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 2: pass"])
    try:
        time.sleep(0.3)
        busy = cpu.busy_cores(0.5)
    finally:
        spin.wait()
    assert 0.6 <= busy <= (os.cpu_count() or 1)
