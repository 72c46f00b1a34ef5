"""Layer inputs parked in pinned host memory during forward, fetched back ahead of their backward.

Offloaded checkpointing (:mod:`corept.checkpointing`) keeps each decoder layer's input ``[B, S, H]``
on the host between the forward and the layer's recompute. The copy out runs on a side CUDA stream
(overlapping the next layer's compute). The copy back is *prefetched*: when a layer's backward has
been issued, the input of the layer created just before it (the next one backward reaches) starts
its host-to-device copy on the side stream, so the recompute finds it on the device instead of
waiting ~0.6 ms (2×2048 tokens of an 8B model) to 1.3 ms (1×8192) per layer on the compute stream.

Why after the backward has been *issued* rather than earlier: the host runs ahead of the GPU, so the
copy still overlaps that layer's queued kernels, and in allocation order the prefetched tensor
appears after the layer's backward temporaries are freed: it adds nothing to the peak.

The chain is a hint, never a dependency: every entry links weakly to the one created before it;
a prefetch of an entry that is gone, already fetched or on another device is skipped, and at most
one prefetched tensor waits for its backward at a time (an older one is dropped, and its ``get``
copies as it would have without prefetch).

Long inputs are not prefetched (``PREFETCH_MAX_BYTES``): the prefetched tensor is allocated on the
side stream, whose cached blocks the compute stream cannot reuse, so each prefetch reserves up to
two inputs' worth of device memory beside the compute pool's. That is ~0.06 GiB at 1×8192 tokens of
an 8B model but ~1.6 GiB at 100k tokens, where it would cost the longest trainable sequence several
thousand tokens while the copy is only a few percent of a layer's time there.

The copies go through a :class:`Transfer` (CUDA streams and events); tests swap in a recording
one to check the order of operations on CPU.
"""
from __future__ import annotations

import threading
import weakref

import torch


class Transfer:
    """The device side of offloading: pinned copies on one side stream per device, and events."""

    def __init__(self):
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def side(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def to_host(self, t: torch.Tensor):
        """Start copying ``t`` into new pinned memory; returns ``(host, done_event)``."""
        side = self.side(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        side.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(side):
            host.copy_(t, non_blocking=True)
            t.record_stream(side)  # keep the device buffer alive until the copy has run
        done = torch.cuda.Event()
        done.record(side)
        return host, done

    def prefetch(self, host: torch.Tensor, device: torch.device, after):
        """Start copying ``host`` back on the side stream (after event ``after``); ``(tensor, ready)``."""
        side = self.side(device)
        with torch.cuda.stream(side):
            side.wait_event(after)
            t = host.to(device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(side)
        return t, ready

    def claim(self, t: torch.Tensor, ready) -> torch.Tensor:
        """Make the compute stream wait for a prefetched ``t`` and hand it over to that stream."""
        cur = torch.cuda.current_stream(t.device)
        cur.wait_event(ready)
        t.record_stream(cur)  # allocated on the side stream, used and freed on this one
        return t

    def fetch(self, host: torch.Tensor, device: torch.device, after) -> torch.Tensor:
        """Copy ``host`` back on the compute stream (no prefetch happened)."""
        torch.cuda.current_stream(device).wait_event(after)
        return host.to(device, non_blocking=True)


PREFETCH_MAX_BYTES = 256 * 2**20
"""Inputs larger than this are fetched back on the compute stream when their backward starts
(no side-stream memory), as they were before prefetching: 32 MiB at 2×2048 tokens and 64 MiB at
1×8192 of an 8B model are prefetched; 800 MiB at 100k tokens is not."""

TRANSFER = Transfer()
"""The transfer every new :class:`HostCopy` uses (tests replace it)."""

_chain = threading.local()  # .last: weakref to the newest HostCopy; .waiting: the one prefetched entry


class HostCopy:
    """A layer input sent to pinned host memory; ``get()`` returns it on its device (once).

    :param t: the input ``[B, S, H]`` on a CUDA device (any dtype).
    """

    def __init__(self, t: torch.Tensor):
        self.device, self.transfer = t.device, TRANSFER
        self.host, self.done = self.transfer.to_host(t)
        self.prefetched = self.ready = None
        last = getattr(_chain, "last", None)
        self.prev = last  # weakref (or None) to the entry created before this one
        _chain.last = weakref.ref(self)

    def prefetch(self) -> None:
        """Start the copy back now (idempotent; a no-op once fetched)."""
        if self.host is None or self.prefetched is not None:
            return
        if self.host.numel() * self.host.element_size() > PREFETCH_MAX_BYTES:
            return
        waiting = getattr(_chain, "waiting", None)
        older = waiting() if waiting is not None else None
        if older is not None and older is not self:
            older.prefetched = older.ready = None  # unclaimed: its own get() copies it again
        self.prefetched, self.ready = self.transfer.prefetch(self.host, self.device, self.done)
        _chain.waiting = weakref.ref(self)

    def prefetch_previous(self) -> None:
        """Prefetch the entry created just before this one, if it is alive, unfetched and on this device."""
        prev = self.prev() if self.prev is not None else None
        if prev is not None and prev.device == self.device:
            prev.prefetch()

    def get(self) -> torch.Tensor:
        """The tensor back on its device, ordered before the compute stream's next work."""
        if self.host is None:
            raise RuntimeError("corept: an offloaded layer input was fetched twice; HostCopy.get() hands "
                               "its tensor over once, to the layer's one recompute")
        if self.prefetched is not None:
            t = self.transfer.claim(self.prefetched, self.ready)
        else:
            t = self.transfer.fetch(self.host, self.device, self.done)
        self.host = self.prefetched = self.ready = None
        return t


class Kept:
    """A layer input left on its device (CPU, short sequences); the same interface as HostCopy."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def get(self) -> torch.Tensor:
        return self.t

    def prefetch_previous(self) -> None:
        return None
