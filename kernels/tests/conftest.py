"""Kernel tests run the Triton kernels on CPU through the interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, i.e. before
``corept_kernels`` is imported, so it is set here at conftest import time.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny tensors: torch's OpenMP threads only contend with the interpreter for the cores (measured:
# the suite ran 3x slower on 2 busy cores without this).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
