"""Kernel tests run the Triton kernels on CPU through the interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, i.e. before
``corept_kernels`` is imported, so it is set here at conftest import time.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
