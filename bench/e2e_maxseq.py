"""Longest trainable sequence: the search, independent of how a probe runs (standard library only).

``search(probe, start, maximum, step)`` finds the largest multiple of ``step`` for which
``probe(seq)`` passes, assuming passing is monotone in ``seq``: from ``start`` it doubles while
probes pass (up to ``maximum``) or halves while they fail (down to ``step``), then bisects the
bracket [last pass, first fail] down to ``step``. A deadline stops it early; the result then says
``complete: False`` and keeps the best pass found so far.
"""
from __future__ import annotations

import time
from typing import Callable


def _floor(n: int, step: int) -> int:
    return max(step, (n // step) * step)


def search(probe: Callable[[int], bool], start: int, maximum: int, step: int = 1024,
           deadline: float | None = None, clock: Callable[[], float] = time.monotonic) -> dict:
    """Largest passing multiple of ``step`` in ``[step, maximum]``.

    :param probe: runs one trial at a sequence length; True if it trained, False if it did not
        (out of memory), None if it gave no answer (the search stops there).
    :param deadline: a ``clock()`` value after which no new probe starts.
    :returns: ``{"max_seq": best pass or None, "first_fail": smallest fail or None,
        "tried": [(seq, ok), ...], "complete": bool}``; ``max_seq == maximum`` with no fail means
        the cap was not reached.
    """
    step = max(1, int(step))
    maximum = _floor(int(maximum), step)
    lo, hi, tried = None, None, []

    def run(seq: int) -> bool | None:
        if deadline is not None and clock() >= deadline:
            return None
        ok = probe(seq)
        if ok is None:  # no answer (e.g. timed out): stop, the result is incomplete
            return None
        tried.append((seq, bool(ok)))
        return bool(ok)

    seq = min(_floor(int(start), step), maximum)
    complete = True
    while True:  # bracket
        ok = run(seq)
        if ok is None:
            complete = False
            break
        if ok:
            lo = seq
            if seq >= maximum or hi is not None:
                break
            seq = min(seq * 2, maximum)
        else:
            hi = seq
            if lo is not None or seq <= step:
                break
            seq = _floor(seq // 2, step)
    while complete and lo is not None and hi is not None and hi - lo > step:  # bisect
        mid = _floor((lo + hi) // 2, step)
        if mid <= lo:
            mid = lo + step
        if mid >= hi:
            break
        ok = run(mid)
        if ok is None:
            complete = False
            break
        lo, hi = (mid, hi) if ok else (lo, mid)
    return {"max_seq": lo, "first_fail": hi, "tried": tried, "complete": complete}


def per_variant(value: str, variants, cast=int) -> dict:
    """Parse ``"8192"`` (all variants) or ``"hf_qlora=8192,unsloth_qlora=65536"`` (missing ones: the
    first bare value, else KeyError)."""
    out, default = {}, None
    for part in filter(None, (p.strip() for p in str(value).split(","))):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = cast(v)
        else:
            default = cast(part)
    for v in variants:
        if v not in out:
            if default is None:
                raise KeyError(f"no value for {v!r} in {value!r}")
            out[v] = default
    return out
