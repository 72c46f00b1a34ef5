"""What the operator modules share."""
from __future__ import annotations

import torch


def unused(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The output an operator returns where it has nothing (a gradient nobody asked for): an
    operator returns tensors, never ``None``. One element, not zero: zero-size CUDA tensors all
    point at address 0, and torch's check that no two outputs alias each other (run on CUDA in
    torch 2.11) took two of them for one tensor."""
    return like.new_zeros((1,), dtype=dtype)  # zeros: a deterministic value (opcheck compares outputs)
