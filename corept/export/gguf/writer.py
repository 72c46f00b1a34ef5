"""Write a (LoRA-merged) model as one GGUF file: :func:`prepare` checks everything, :func:`GGUFJob.write` works.

:func:`prepare` refuses, before any weight is touched, an unknown quantization mix, an architecture
whose plugin declares no :class:`~corept.GGUFExport`, a weight with no GGUF name, an unsupported RoPE
type and a tokenizer GGUF cannot hold. :meth:`GGUFJob.write` then streams the weights: each is
merged in float32 (4-bit bases dequantized first, as ``merged_16bit`` does), laid out as llama.cpp
expects (:mod:`.names`), quantized on the device it lives on (:mod:`.quants`; the ``gguf`` package's
quantizers for the Q5_0/Q5_1 fallbacks) and written through ``gguf.GGUFWriter``. Every tensor's
type and size are known from its shape, so the header is written first and the weights stream after
it one at a time: host memory holds one merged weight, not the model.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from corept.errors import InvalidOptionsError, UnsupportedArchitectureError
from corept.export.gguf.metadata import check_rope, write_metadata
from corept.export.gguf.mix import FILE_TYPES, MIXES, tensor_type
from corept.export.gguf.names import TensorPlan, tensor_plan, to_file
from corept.export.gguf.quants import QUANTIZERS
from corept.export.gguf.vocab import check_tokenizer, write_vocab
from corept.patching.engine import base_of
from corept.saving.merge import merged_items, tied_embeddings

logger = logging.getLogger("corept")


def normalize_mix(quantization: str) -> str:
    mix = str(quantization).lower().replace("-", "_")
    if mix not in MIXES:
        raise InvalidOptionsError(f"GGUF quantization {quantization!r} unknown; use one of {', '.join(MIXES)}")
    return mix


def encode(t: torch.Tensor, qtype) -> np.ndarray:
    """``t`` (float, GGUF layout) as the array ``gguf.GGUFWriter`` stores for ``qtype``: float32/16
    values, or the blocks' bytes (uint8, one row per tensor row)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if qtype == Q.F32:
        return t.float().cpu().numpy()
    if qtype == Q.F16:
        return t.half().cpu().numpy()
    if qtype == Q.BF16:
        return t.bfloat16().cpu().view(torch.uint8).numpy()
    name = qtype.name.lower()
    if name in QUANTIZERS:
        return QUANTIZERS[name](t.float())[0].cpu().numpy()
    return gguf.quants.quantize(t.float().cpu().numpy(), qtype)


@dataclass
class GGUFJob:
    """A checked export: the model, its weights' plan, and the file's settings."""

    model: nn.Module
    tokenizer: object
    resolved: object
    mix: str
    plans: list[TensorPlan]
    makers: dict = field(repr=False)
    shapes: dict = field(repr=False)
    tied: bool
    name: str

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.mix.upper()}.gguf"

    def write(self, path: Path) -> dict:
        """Write the file at ``path``; returns ``{"types": {gguf type: count}, "seconds": s}``."""
        import gguf

        export, config = self.resolved.declaration.gguf, self.resolved.config
        start = time.perf_counter()
        writer = gguf.GGUFWriter(path, export.arch)
        writer.add_type("model")
        writer.add_name(self.name)
        writer.add_file_type(int(FILE_TYPES[self.mix]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        extra = write_metadata(writer, export, config, base_of(self.model))
        if self.tokenizer is not None:
            write_vocab(writer, self.tokenizer, int(config.vocab_size))
        n_layers = int(config.num_hidden_layers)
        order = [(key, tuple(t.shape), gguf.GGMLQuantizationType.F32, lambda t=t: t) for key, t in extra.items()]
        for plan in self.plans:
            shape = self.shapes[plan.hf]
            make = (lambda plan=plan: to_file(plan, self.makers[plan.hf]()))
            order.append((plan.gguf, shape, tensor_type(self.mix, plan.gguf, shape, n_layers, self.tied), make))
        counts: dict[str, int] = {}
        for name, shape, qtype, _ in order:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) // block * size, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad():
            for name, shape, qtype, make in order:
                writer.write_tensor_data(encode(make(), qtype))
        writer.close()
        seconds = time.perf_counter() - start
        logger.info("corept: GGUF %s written in %.1f s (%s)", path.name, seconds,
                    ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        return {"types": counts, "seconds": seconds}


def prepare(model: nn.Module, tokenizer, quantization: str = "q8_0", name: str | None = None) -> GGUFJob:
    """Check that ``model`` can be exported as ``quantization`` and plan it (no weight is computed)."""
    from corept.registry.resolution import resolve

    mix = normalize_mix(quantization)
    base = base_of(model)
    resolved = resolve(base.config, warn=False)
    if resolved is None:
        raise UnsupportedArchitectureError(f"GGUF export: no installed plugin claims model_type "
                                           f"{getattr(base.config, 'model_type', None)!r}")
    if resolved.declaration.gguf is None:
        raise UnsupportedArchitectureError(
            f"GGUF export: the {resolved.plugin!r} plugin declares no GGUF mapping for {resolved.model_type!r} "
            "(Architecture(gguf=GGUFExport(arch=..., tensors=...))); save with method='merged_16bit' instead")
    check_rope(resolved.config, resolved.declaration.gguf)
    tied = tied_embeddings(base)
    items = [(k, s, f) for k, s, f in merged_items(model, torch.float32, cpu=False)
             if not (tied and k.endswith("lm_head.weight"))]
    makers, shapes = {k: f for k, _, f in items}, {k: s for k, s, _ in items}
    plans = tensor_plan(base, resolved, list(makers))
    if tokenizer is not None:
        check_tokenizer(tokenizer, int(resolved.config.vocab_size))
    label = name or str(getattr(base.config, "_name_or_path", "") or "model").rstrip("/").rsplit("/", 1)[-1] or "model"
    return GGUFJob(model, tokenizer, resolved, mix, plans, makers, shapes, tied, label)
