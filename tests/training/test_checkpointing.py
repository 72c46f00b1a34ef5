"""Offloaded checkpointing: gradients equal plain autograd's, and each layer input is fetched back
ahead of its backward (prefetch), checked on CPU through a recording transfer and on CUDA for real."""
from __future__ import annotations

import pytest
import torch

import corept.training.offload as offload
from corept.training.checkpointing import OffloadedCheckpoint


class RecordingTransfer:
    """CPU stand-in for :class:`corept.training.offload.Transfer`: clones instead of copies, logs each step."""

    def __init__(self, log: list):
        self.log = log
        self.names: dict[int, int] = {}

    def _name(self, host) -> int:
        return self.names[id(host)]

    def to_host(self, t):
        host = t.detach().clone()
        self.names[id(host)] = len(self.names)
        self.log.append(("to_host", self._name(host)))
        return host, "done"

    def prefetch(self, host, device, after):
        assert after == "done"
        self.log.append(("prefetch", self._name(host)))
        return host.clone(), "ready"

    def claim(self, t, ready):
        assert ready == "ready"
        self.log.append(("claim",))
        return t

    def fetch(self, host, device, after):
        self.log.append(("fetch", self._name(host)))
        return host.clone()


def _layers(n: int, width: int = 6):
    torch.manual_seed(0)
    return [torch.nn.Linear(width, width) for _ in range(n)]


def _layer_fn(lin, i, log):
    def fn(h):
        out = torch.nn.functional.silu(lin(h)) + h
        if torch.is_grad_enabled():  # the recompute: note when autograd reaches this layer's backward
            out.register_hook(lambda g: log.append(("backward", i)))
        return out
    return fn


def _run(layers, x, offload_inputs: bool, log=None):
    h = x
    for i, lin in enumerate(layers):
        if log is None:
            h = torch.nn.functional.silu(lin(h)) + h
        else:
            h = OffloadedCheckpoint.apply(_layer_fn(lin, i, log), offload_inputs, h)
    h.square().sum().backward()
    return [p.grad.clone() for lin in layers for p in lin.parameters()]


def test_offloaded_inputs_come_back_prefetched_one_layer_ahead(monkeypatch):
    log: list = []
    monkeypatch.setattr(offload, "TRANSFER", RecordingTransfer(log))
    layers = _layers(4)
    x = torch.randn(3, 5, 6, requires_grad=True)
    got = _run(layers, x, True, log)
    for lin in layers:
        lin.zero_grad()
    want = _run(layers, x.detach().requires_grad_(True), False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert log == [("to_host", 0), ("to_host", 1), ("to_host", 2), ("to_host", 3),
                   ("fetch", 3), ("backward", 3), ("prefetch", 2),
                   ("claim",), ("backward", 2), ("prefetch", 1),
                   ("claim",), ("backward", 1), ("prefetch", 0),
                   ("claim",), ("backward", 0)]


def test_an_unclaimed_prefetch_is_dropped_for_the_newer_one(monkeypatch):
    log: list = []
    monkeypatch.setattr(offload, "TRANSFER", RecordingTransfer(log))
    a = offload.HostCopy(torch.ones(2, 3))
    b = offload.HostCopy(torch.full((2, 3), 2.0))
    a.prefetch()
    b.prefetch()  # a's copy is dropped: at most one prefetched tensor waits at a time
    assert a.prefetched is None and b.prefetched is not None
    assert torch.equal(a.get(), torch.ones(2, 3)) and torch.equal(b.get(), torch.full((2, 3), 2.0))
    assert log == [("to_host", 0), ("to_host", 1), ("prefetch", 0), ("prefetch", 1), ("fetch", 0), ("claim",)]
    a.prefetch()  # fetched already: nothing to do
    with pytest.raises(RuntimeError, match="fetched twice"):
        a.get()


def test_prefetch_follows_only_live_entries(monkeypatch):
    log: list = []
    monkeypatch.setattr(offload, "TRANSFER", RecordingTransfer(log))
    a = offload.HostCopy(torch.ones(1))
    b = offload.HostCopy(torch.ones(1))
    del a  # its graph was freed (e.g. a no-grad forward): the chain's weak link is dead
    b.prefetch_previous()
    assert log == [("to_host", 0), ("to_host", 1)]


def test_inputs_above_the_prefetch_size_come_back_when_their_backward_starts(monkeypatch):
    log: list = []
    monkeypatch.setattr(offload, "TRANSFER", RecordingTransfer(log))
    monkeypatch.setattr(offload, "PREFETCH_MAX_BYTES", 4 * 6)  # 6 fp32 values
    small, big = offload.HostCopy(torch.ones(6)), offload.HostCopy(torch.ones(7))
    big.prefetch()
    small.prefetch()
    assert big.prefetched is None and small.prefetched is not None
    big.get(), small.get()
    assert log == [("to_host", 0), ("to_host", 1), ("prefetch", 0), ("fetch", 1), ("claim",)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the real streams, events and pinned copies")
def test_cuda_offload_with_prefetch_matches_plain_autograd():
    layers = [lin.cuda() for lin in _layers(5, 64)]
    x = torch.randn(2, 700, 64, device="cuda", requires_grad=True)
    got = _run(layers, x, True, log=[])
    for lin in layers:
        lin.zero_grad()
    want = _run(layers, x.detach().requires_grad_(True), False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
