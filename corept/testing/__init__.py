"""corept's conformance kit: the checks every architecture plugin runs against the HF reference.

Use it by subclassing :class:`ConformanceSuite` in a plugin's test module (see
docs/conformance.md and docs/writing-a-plugin.md)::

    from corept.testing import ConformanceSuite, tiny_config

    class TestMyArch(ConformanceSuite):
        plugin = "myarch"
        configs = {"gqa": lambda: tiny_config("myarch")}

Names are imported lazily: pytest imports this package at startup (for the ``pytest11`` plugin
:mod:`corept.testing.pytest_plugin`), which must run before anything imports ``corept_kernels``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ConformanceSuite": "corept.testing.suite",
    "MatrixCase": "corept.testing.cases",
    "full_cases": "corept.testing.cases",
    "quirk_cases": "corept.testing.cases",
    "assert_fp32_close": "corept.testing.tolerances",
    "assert_bf16_within": "corept.testing.tolerances",
    "scaled_error": "corept.testing.tolerances",
    "RTOL": "corept.testing.tolerances",
    "BF16_FACTOR": "corept.testing.tolerances",
    "BF16_FLOOR": "corept.testing.tolerances",
    "tiny_config": "corept.testing.configs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'corept.testing' has no attribute {name!r}")
