"""Host (CPU) memory: how much pinned RAM corept's offloaded checkpoints may take.

``corept`` checkpointing parks every decoder layer's input in pinned (page-locked) host memory
(:mod:`corept.training.offload`). Pinned pages cannot be swapped or reclaimed, so running short of
them does not slow training down: it gets the process (or a neighbour) killed. The planner
therefore treats pinned host RAM as a constraint like VRAM, with this rule (every number is a
parameter below)::

    budget = min(available, HOST_FRACTION * total) - HOST_RESERVE_GIB * processes

* ``total``: physical RAM (``MemTotal`` of ``/proc/meminfo``, else ``os.sysconf``), capped by a
  cgroup memory limit when one is set (containers);
* ``available``: RAM available now without swapping (``MemAvailable``, else free pages), so what
  other programs already use is left alone;
* ``HOST_FRACTION`` = 0.8: pinned pages never exceed 80% of the machine, the rest stays for the
  kernel, the page cache the weights are read through and whatever else runs;
* ``HOST_RESERVE_GIB`` = 4 per training process (one per GPU): its own unpinned memory, i.e.
  Python, the torch/CUDA runtime (~2-3 GiB resident), the tokenized data and the weight shards
  that pass through host memory while the model loads.

``host_ram=G`` (``corept plan --host-ram G``) plans for a machine with ``G`` GiB of RAM, all of it
available (``total = available = G``): deterministic, and the way to plan for another machine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from corept.errors import InvalidOptionsError
from corept.planning.gpus import GIB

HOST_FRACTION = 0.8
HOST_RESERVE_GIB = 4.0
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


@dataclass(frozen=True)
class HostMemory:
    """Host RAM the planner checks pinned memory against (bytes; ``None`` when unknown).

    :param source: ``"detected"``, ``"--host-ram"`` or ``"unknown"`` (not checked).
    :param how: where a detected figure came from (``/proc/meminfo``, ``sysconf``, a cgroup limit).
    """

    total: int | None
    available: int | None
    source: str
    how: str = ""

    @property
    def known(self) -> bool:
        return self.total is not None and self.available is not None

    def budget(self, processes: int = 1) -> int | None:
        """Pinned bytes allowed for ``processes`` training processes on this host (see the rule)."""
        if not self.known:
            return None
        cap = min(self.available, int(HOST_FRACTION * self.total))
        return max(0, cap - int(HOST_RESERVE_GIB * GIB) * max(1, processes))

    def describe(self, processes: int = 1) -> str:
        """One line: the budget and where it came from."""
        if not self.known:
            return f"host RAM unknown ({self.how or 'not detected'}): pinned host RAM not checked, pass --host-ram GIB"
        g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
        where = "--host-ram" if self.source == "--host-ram" else f"detected, {self.how}"
        per = f" - {HOST_RESERVE_GIB:g} GiB x {processes} processes" if processes > 1 else \
            f" - {HOST_RESERVE_GIB:g} GiB"
        return (f"budget {g(self.budget(processes))} GiB = min({g(self.available)} GiB available, "
                f"{HOST_FRACTION:.0%} of {g(self.total)} GiB){per} ({where})")

    def to_dict(self, processes: int = 1) -> dict:
        g = lambda b: None if b is None else round(b / GIB, 3)  # noqa: E731
        return {"source": self.source, "how": self.how, "total_gib": g(self.total),
                "available_gib": g(self.available), "budget_gib": g(self.budget(processes)),
                "fraction": HOST_FRACTION, "reserve_gib_per_process": HOST_RESERVE_GIB, "processes": processes}


def _meminfo(path: str = "/proc/meminfo") -> tuple[int | None, int | None]:
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    fields[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        return None, None
    avail = fields.get("MemAvailable")
    if avail is None and "MemFree" in fields:  # kernels before 3.14
        avail = fields["MemFree"] + fields.get("Cached", 0) + fields.get("Buffers", 0)
    return fields.get("MemTotal"), avail


def _sysconf() -> tuple[int | None, int | None]:
    def conf(name):
        try:
            v = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            return None
        return v if v and v > 0 else None

    page = conf("SC_PAGE_SIZE")
    total, free = conf("SC_PHYS_PAGES"), conf("SC_AVPHYS_PAGES")
    if page is None or total is None:
        return None, None
    return total * page, (free if free is not None else total) * page  # no free count: assume idle


def _cgroup_limit(paths=_CGROUP_LIMITS) -> int | None:
    for path in paths:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" / a huge number: no limit
            return int(text)
    return None


def detect_host_memory() -> HostMemory:
    """Total and available RAM of this machine (``/proc/meminfo``, else ``os.sysconf``)."""
    total, avail = _meminfo()
    how = "/proc/meminfo"
    if total is None or avail is None:
        total, avail = _sysconf()
        how = "os.sysconf"
    if total is None or avail is None:
        return HostMemory(None, None, "unknown", "neither /proc/meminfo nor os.sysconf reports it")
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        total, avail, how = limit, min(avail, limit), how + " + cgroup limit"
    return HostMemory(total, avail, "detected", how)


def host_memory(host_ram: float | HostMemory | None = None) -> HostMemory:
    """``host_ram`` GiB of RAM (a machine with that much, all available), or this machine's."""
    if isinstance(host_ram, HostMemory):
        return host_ram
    if host_ram is None:
        return detect_host_memory()
    if isinstance(host_ram, bool) or not isinstance(host_ram, (int, float)) or not host_ram > 0:
        raise InvalidOptionsError(f"--host-ram must be a positive number of GiB, got {host_ram!r}")
    b = int(float(host_ram) * GIB)
    return HostMemory(b, b, "--host-ram", f"{host_ram:g} GiB")


def ram_for(pinned: int, processes: int = 1) -> float:
    """The GiB of RAM (all available) a machine needs to pin ``pinned`` bytes under the rule."""
    return (pinned + HOST_RESERVE_GIB * GIB * max(1, processes)) / HOST_FRACTION / GIB
