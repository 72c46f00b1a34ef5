"""``bench/gguf_export.py`` never rots: its quantizer timing runs on CPU at a small layer shape and
writes every field the results files carry. Nothing here is timed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent


def test_layer_timing_fields_on_cpu(monkeypatch):
    spec = importlib.util.spec_from_file_location("gguf_export_bench", BENCH / "gguf_export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "LAYER_SHAPES", [(8, 256), (4, 512)])
    out = mod.time_layers("cpu", repeats=1)
    assert out["values_per_layer"] == 8 * 256 + 4 * 512
    for name in ("q8_0", "q4_k", "q5_k", "q6_k"):
        row = out[name]
        assert row["layer_seconds"] > 0 and row["values_per_second"] > 0 and row["model_seconds_scaled"] >= 0
