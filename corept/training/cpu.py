"""CPU runs on a shared machine: use only the cores other processes leave idle, and keep adjusting.

torch's intra-op threads synchronize at every op. When another process keeps a core busy, two
threads on two cores keep waiting for each other: measured here, one SmolLM2-135M LoRA step took
5.0 s with 2 threads next to one busy process and 2.8 s with 1 thread (1.6 s with 2 threads on an
idle machine). So a CPU run starts with ``cores - busy`` threads (:func:`initial_threads`) and
:class:`ThreadGovernor` re-measures every few optimizer steps. ``OMP_NUM_THREADS`` disables both.
Busy cores come from ``/proc/stat`` (machine-wide, sampled), minus this process's own CPU time.
"""
from __future__ import annotations

import logging
import os
import time

import torch
from transformers import TrainerCallback

logger = logging.getLogger("corept")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _proc_stat() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of the whole machine."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    return values[3] + values[4], sum(values)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def managed() -> bool:
    """Whether corept chooses the thread count: a CPU-only run without ``OMP_NUM_THREADS``."""
    return not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ and os.path.exists("/proc/stat")


def _machine_busy(idle0: int, total0: int, idle1: int, total1: int) -> float:
    """Busy cores of the whole machine between two ``/proc/stat`` samples."""
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / max(1, total1 - total0))


def busy_cores(seconds: float = 0.5) -> float:
    """Cores other processes keep busy, measured over ``seconds`` (this process sleeps meanwhile)."""
    idle0, total0 = _proc_stat()
    time.sleep(seconds)
    return _machine_busy(idle0, total0, *_proc_stat())


def _want(others: float, ceiling: int) -> int:
    return max(1, min(ceiling, int(_cores() - others + 0.5)))


def initial_threads() -> str | None:
    """Lower torch's thread count to the idle cores before a CPU run; a note, or ``None`` if unchanged."""
    if not managed():
        return None
    others = busy_cores()
    want = _want(others, torch.get_num_threads())
    if want >= torch.get_num_threads():
        return None
    torch.set_num_threads(want)
    return (f"cpu: other processes keep {others:.1f} of {_cores()} cores busy, so {want} torch thread(s) "
            f"(re-measured during training; set OMP_NUM_THREADS to choose)")


class ThreadGovernor(TrainerCallback):
    """Every ``every`` optimizer steps, set torch's threads to the cores other processes leave idle.

    :param ceiling: most threads ever used (torch's count when the run started).
    ``changes`` records ``(step, threads)`` of every adjustment.
    """

    def __init__(self, ceiling: int, every: int = 5):
        self.ceiling, self.every = ceiling, every
        self.changes: list[tuple[int, int]] = []
        self._last = None

    def _sample(self):
        return (*_proc_stat(), _own_cpu(), time.monotonic())

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self._sample()

    def on_step_end(self, args, state, control, **kwargs):
        if self._last is None or state.global_step % self.every:
            return
        now = self._sample()
        (idle0, total0, own0, t0), (idle1, total1, own1, t1) = self._last, now
        self._last = now
        others = max(0.0, _machine_busy(idle0, total0, idle1, total1) - (own1 - own0) / max(t1 - t0, 1e-3))
        want = _want(others, self.ceiling)
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
            self.changes.append((state.global_step, want))
            logger.info("corept: step %d: other processes keep %.1f cores busy -> %d torch thread(s)",
                        state.global_step, others, want)
