"""Shared fixture of the bench tests: bench modules by file path.

bench/ is never put on ``sys.path`` (its kernels.py would shadow the ``kernels`` package that
transformers and bitsandbytes probe for), so its modules are loaded from their files.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"corept_bench_test_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def bench_module():
    """``bench_module("e2e_report")`` -> the freshly loaded bench/e2e_report.py."""
    return _load
