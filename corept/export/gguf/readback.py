"""Read a GGUF file written for ``model`` back into transformers names, for checking an export.

Dequantization is the ``gguf`` package's (the same code transformers' GGUF loader uses); names and
layouts are inverted through the same plan the writer used, so this works for every architecture a
plugin declares, including those transformers' GGUF loader does not read.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from corept.export.gguf.names import from_file


def read_back(path: str | Path, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, types)``: float32 weights under ``model``'s transformers names, and each
    weight's GGUF type name. Tensors the model has no weight for (``rope_freqs``) are skipped."""
    import gguf

    from corept.export.gguf.writer import prepare

    plans = {p.gguf: p for p in prepare(model, None, "f16").plans}
    reader = gguf.GGUFReader(str(path))
    state, types = {}, {}
    for t in reader.tensors:
        plan = plans.get(t.name)
        if plan is None:
            continue
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = [int(n) for n in reversed(t.shape.tolist())]
        state[plan.hf] = from_file(plan, torch.from_numpy(values.astype("float32", copy=True)).reshape(shape))
        types[plan.hf] = t.tensor_type.name
    return state, types
