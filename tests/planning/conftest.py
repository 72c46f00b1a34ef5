"""Planner tests are deterministic: the "detected" host is a fixed 256 GiB machine.

The planner checks pinned host RAM against this machine's RAM unless ``host_ram`` is given
(:mod:`corept.planning.host`); tests that are about the host pass ``host_ram`` or call the
detection helpers with their own files (``monkeypatch.undo()`` restores the real detection).
"""
import pytest

from corept.planning import host
from corept.planning.gpus import GIB


@pytest.fixture(autouse=True)
def _fixed_host(monkeypatch):
    monkeypatch.setattr(host, "detect_host_memory",
                        lambda: host.HostMemory(256 * GIB, 256 * GIB, "detected", "tests: a fixed 256 GiB machine"))
    yield
