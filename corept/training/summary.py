"""The end-of-run summary: loss curve (first / min / last, a sparkline and a small table), and the
training data's record for ``run.json``.

Losses come from the HF Trainer's ``state.log_history`` (one entry per ``logging_steps``).
"""
from __future__ import annotations

import math
from pathlib import Path

BARS = "▁▂▃▄▅▆▇█"


def loss_points(log_history: list[dict], key: str = "loss") -> list[tuple[int, float]]:
    """``(step, value)`` for every training log entry that has ``key`` (the loss; GRPO: also "reward")."""
    return [(int(e.get("step", i)), float(e[key])) for i, e in enumerate(log_history)
            if key in e and isinstance(e[key], (int, float))]


def _downsample(values: list[float], width: int) -> list[float]:
    if len(values) <= width:
        return values
    out = []
    for i in range(width):
        a = i * len(values) // width
        chunk = values[a:max(a + 1, (i + 1) * len(values) // width)]
        out.append(sum(chunk) / len(chunk))
    return out


def sparkline(values: list[float], width: int = 60) -> str:
    """One block character per value (low to high), averaged down to at most ``width`` of them."""
    vals = _downsample([v for v in values if math.isfinite(v)], width)
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo
    return "".join(BARS[0 if span == 0 else min(len(BARS) - 1, int((v - lo) / span * len(BARS)))] for v in vals)


def loss_table(points: list[tuple[int, float]], rows: int = 6, key: str = "loss") -> list[str]:
    """Up to ``rows`` evenly spaced ``step  <key>`` lines, always with the first and the last."""
    if not points:
        return []
    if len(points) <= rows:
        chosen = points
    else:
        idx = sorted({round(i * (len(points) - 1) / (rows - 1)) for i in range(rows)})
        chosen = [points[i] for i in idx]
    return [f"    step {s:>5}  {key} {v:.4f}" for s, v in chosen]


TAIL = 5  # logged values averaged into "last_mean" (single steps are noisy at small batch sizes)


def loss_summary(log_history: list[dict], key: str = "loss") -> dict:
    """``{"first", "min", "max", "last", "last_mean", "steps", "points"}`` of the logged ``key`` (the
    training loss by default; ``None`` values if none was logged)."""
    pts = loss_points(log_history, key)
    if not pts:
        return {"first": None, "min": None, "max": None, "last": None, "last_mean": None, "steps": 0, "points": []}
    vals = [v for _, v in pts]
    tail = vals[-TAIL:]
    return {"first": vals[0], "min": min(vals), "max": max(vals), "last": vals[-1], "last_mean": sum(tail) / len(tail),
            "steps": pts[-1][0], "points": pts}


def format_loss_summary(log_history: list[dict], key: str = "loss") -> str:
    """Human-readable summary of the logged ``key``: first/min (max for a reward)/last, sparkline and table."""
    s = loss_summary(log_history, key)
    if s["first"] is None:
        return f"{key}: (no training {key} was logged)"
    vals = [v for _, v in s["points"]]
    best = f"max {s['max']:.4f}" if key == "reward" else f"min {s['min']:.4f}"
    lines = [f"{key}: first {s['first']:.4f}  {best}  last {s['last']:.4f}  "
             f"(mean of the last {min(TAIL, len(vals))}: {s['last_mean']:.4f}; {len(vals)} logged steps)",
             f"  {sparkline(vals)}"]
    lines += loss_table(s["points"], key=key)
    return "\n".join(lines)


def data_record(path: str | None) -> dict:
    """What ``run.json`` keeps about the training data: the path, its sha256 (files up to 1 GiB) and,
    for corept's shipped datasets, which package version they came from (their path lies inside an
    install folder that may be gone later)."""
    import hashlib
    from importlib import metadata
    from importlib import resources

    out = {"path": path, "sha256": None, "shipped": None}
    if not path:
        return out
    p = Path(path).expanduser()
    if p.is_file() and p.stat().st_size <= 2**30:
        digest = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        out["sha256"] = digest.hexdigest()
    shipped = Path(str(resources.files("corept") / "data"))
    if p.is_file() and p.resolve().parent == shipped.resolve():
        out["shipped"] = f"corept {metadata.version('corept')} package data: corept/data/{p.name}"
    return out
