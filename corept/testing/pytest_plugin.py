"""pytest plugin shipped by corept (``pytest11`` entry point ``corept``), loaded at pytest startup.

* Turns the Triton interpreter on (``TRITON_INTERPRET=1``) when it is not set and there is no
  CUDA device, *at import*: pytest imports this module before any conftest or test module, and
  ``@triton.jit`` fixes the Triton mode when ``corept_kernels`` is first imported. An explicit
  ``TRITON_INTERPRET`` (``0`` included) is never overridden.
* Reports the Triton mode and the installed corept plugins in pytest's header.
* Fixtures for plugin tests that go beyond :class:`corept.testing.ConformanceSuite`:
  ``corept_tiny_batch`` and ``corept_plugin_records``; and ``corept_progress``, for any test or
  fixture that runs for a minute or more to say what it is doing.

The conformance suite itself needs nothing from here (its parametrization and fixtures live on
the class), so it also works with ``-p no:corept``, provided the interpreter is set by then.
"""
from __future__ import annotations

import os
import sys

_SET_BY_US = False
_KERNELS_EARLY = "corept_kernels" in sys.modules


def _no_cuda() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch: nothing will launch kernels anyway
        return True


if "TRITON_INTERPRET" not in os.environ and _no_cuda():
    os.environ["TRITON_INTERPRET"] = "1"
    _SET_BY_US = True

import pytest  # noqa: E402


def triton_mode() -> str:
    """One line: how Triton kernels run in this session and who decided it."""
    value = os.environ.get("TRITON_INTERPRET")
    if value in (None, "", "0"):
        return "Triton kernels compiled for the GPU (TRITON_INTERPRET unset)"
    how = "set by corept.testing: no CUDA device" if _SET_BY_US else "set in the environment"
    return f"TRITON_INTERPRET={value} ({how})"


def pytest_report_header(config):
    lines = [f"corept: {triton_mode()}"]
    if _KERNELS_EARLY and _SET_BY_US:
        lines.append("corept: WARNING corept_kernels was imported before TRITON_INTERPRET could be set; "
                     "its kernels were built for a GPU driver and will fail to launch on CPU")
    try:
        from corept.registry.manager import get_plugin_manager

        recs = get_plugin_manager().records.values()
        shown = ", ".join(f"{r.name}({','.join(a.model_type for a in r.architectures)})" if r.loaded
                          else f"{r.name}[{r.error}]" for r in recs)
        lines.append(f"corept plugins: {shown or 'none'}")
    except Exception as exc:  # noqa: BLE001 - a header must never break the session
        lines.append(f"corept plugins: could not be listed ({type(exc).__name__}: {exc})")
    return lines


def pytest_configure(config):
    config.addinivalue_line("markers", "corept_real_model: runs a real (non-tiny) model; slow under the "
                                       "Triton interpreter")


@pytest.fixture(scope="session")
def corept_progress(pytestconfig):
    """``corept_progress("...")`` writes a line to the terminal at once, past output capture and
    ``-q``: a long test says what it runs, so no test is silent for minutes."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(message: str) -> None:
        if reporter is None or capture is None:
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[{message}]")
    return say


@pytest.fixture
def corept_tiny_batch():
    """``make(vocab, batch=2, seq=8, seed=1)`` -> a padded batch dict (see corept.testing.builders)."""
    from corept.testing.builders import make_batch

    def make(vocab: int, batch: int = 2, seq: int = 8, seed: int = 1) -> dict:
        return make_batch(vocab, batch, seq, seed)

    return make


@pytest.fixture
def corept_plugin_records():
    """``{plugin name: PluginRecord}`` of the loaded corept plugins."""
    from corept.registry.manager import get_plugin_manager

    return dict(get_plugin_manager().records)
