"""Core test configuration.

The Triton interpreter must be on before any ``@triton.jit`` decorator runs (before corept_kernels
is imported) and the hub must never be asked, so both variables are set here, at conftest import,
before anything imports a kernel. (pytest imports ``corept`` itself earlier, through corept's
``pytest11`` plugin entry point; ``import corept`` and plugin loading therefore must not import
corept_kernels: tests/test_cli.py::test_import_corept_does_not_import_kernels guards that.)

Helpers: :mod:`tiny` (tiny models, tokenizers, HF-cache layouts) and :mod:`plugin_factory`
(throwaway plugin distributions, subprocess runner).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _var in ("COREPT_PLUGINS", "COREPT_DISABLE_PLUGINS", "COREPT_TRACE"):
    os.environ.pop(_var, None)  # the in-process tests expect every installed plugin

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def corept_warnings(caplog):
    """Capture WARNING+ records of the ``corept`` logger; returns the caplog fixture."""
    caplog.set_level(logging.WARNING, logger="corept")
    return caplog


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """model_type -> folder holding a tiny saved model + tokenizer (the 7 architectures and gpt2)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {mt: tiny.save_tiny(root / mt, mt) for mt in tiny.ARCHS + ("gpt2",)}


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory):
    """A hand-built HF hub cache: ``unsloth/Qwen3-8B``, ``Qwen/Qwen3-8B`` (tiny Qwen3s), ``Qwen/Qwen2.5-7B``."""
    cache = tmp_path_factory.mktemp("hf-hub-cache")
    tiny.hf_cache_repo(cache, "unsloth/Qwen3-8B", "qwen3", commit="1" * 40, seed=3)
    tiny.hf_cache_repo(cache, "Qwen/Qwen3-8B", "qwen3", commit="2" * 40, seed=4)
    tiny.hf_cache_repo(cache, "Qwen/Qwen2.5-7B", "qwen2", commit="5" * 40, seed=5)  # a dotted repo id
    return cache

