"""Fixtures of the training tests: a tiny chat model saved once, small memorizable data, kernel mode.

Kernel mode. ``tests/conftest.py`` turns the Triton interpreter on for the whole core suite. These
tests run TRL trainers, saving and the CLI over many optimizer steps; under the interpreter every
kernel program runs in Python and one tiny training step costs seconds, which would put this
folder far over its time budget. So each test here runs with ``TRITON_INTERPRET=0``: corept's
patches stay applied (the report says ``torch:<kernel>``) and each kernel call dispatches to its
pure-torch twin (``corept_kernels.capabilities`` decides per call). Kernel numerics are the job of
``kernels/tests``; tests marked ``triton_interpreter`` (test_train_interpreter.py) keep the
interpreter on to show TRL training runs through the Triton kernels too. Triton fixes a kernel's
mode when its module is imported, so the kernels are imported here, at collection, while
``TRITON_INTERPRET`` is still the session's value.
"""
import os

import corept_kernels  # noqa: F401 - build every @triton.jit kernel now, in the session's mode (interpreter)
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_interpreter: keep TRITON_INTERPRET=1 (Triton kernels through "
                                       "the interpreter) instead of the torch twins")


@pytest.fixture(autouse=True)
def _kernel_mode(request, monkeypatch):
    if request.node.get_closest_marker("triton_interpreter") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    yield


@pytest.fixture(scope="session")
def corept_cache(tmp_path_factory):
    """A private corept cache (COREPT_CACHE) shared by the session's CLI runs."""
    return tmp_path_factory.mktemp("corept-cache")


@pytest.fixture(autouse=True)
def _restore_threads():
    """corept train may lower torch's thread count on a busy CPU (run.cpu_threads); undo it per test."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _private_cache(corept_cache, monkeypatch):
    monkeypatch.setenv("COREPT_CACHE", str(corept_cache))
    monkeypatch.setenv("COREPT_DEMO_MODEL", "tiny")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    """Folder of a tiny random Llama with a chat-template tokenizer (corept.training.defaults)."""
    from corept.training.defaults import build_tiny_chat_model

    return str(build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), "llama"))


@pytest.fixture
def clean_env():
    """Environment for subprocesses: this one, minus PYTHONPATH (callers set their own), and without
    the ``.venv`` link to corept's build folder (``COREPT_BUILD_LINK=0``): corept only where a
    caller puts it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", COREPT_BUILD_LINK="0")
    return env


@pytest.fixture
def corept_env():
    """Environment for subprocesses that import corept: PYTHONPATH made absolute, corept's folder first."""
    import corept

    entries = [os.path.dirname(os.path.dirname(os.path.abspath(corept.__file__)))]
    entries += [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(entries))
    return env


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a run gets as far as loading the model."""
    from corept.training import run as run_module

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(run_module, "_load_model", refuse)
