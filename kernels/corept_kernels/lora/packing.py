"""LoRA linears as the tensors and numbers a torch custom operator can take, and back.

A custom operator's arguments are tensors, lists of them and Python scalars, so the fused LoRA
functions' :class:`~corept_kernels.lora.weights.LoraWeights` (and a 4-bit base's bitsandbytes
``QuantState``) travel into :mod:`corept_kernels.ops.lora` flattened by :func:`pack` and are
rebuilt inside by :func:`unpack`. Everything that differs between the decoder layers of one
model is a tensor (weights, adapters, quantization statistics); the numbers (window, shapes,
block sizes, scaling) are usually equal across layers, so one compiled graph serves them all.

Per linear ``i`` (``k`` linears):

* ``weights[i]`` the base weight (a 4-bit one's packed bytes), ``As[i]`` ``[r, in]``,
  ``Bs[i]`` ``[out, r]``, ``biases[i]`` ``[out]`` or ``None``;
* ``qtensors[5i:5i+5]``: ``absmax``, ``code``, ``offset``, nested ``absmax``, nested ``code``
  (``None`` where absent: a float base, or no double quantization);
* ``ints[INTS*i:INTS*(i+1)]``: see :data:`_FIELDS`; ``scalings[i]``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from corept_kernels.lora.weights import LoraWeights

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_QUANT_TYPES = ("nf4", "fp4")
_FIELDS = ("out", "rows_start", "rows_stop", "base_out", "base_in", "blocksize", "blocksize2",
           "quant_type", "dtype", "dtype2")
INTS = len(_FIELDS)
QTENSORS = 5


class Packed(NamedTuple):
    """The flattened form of k LoRA linears (see the module notes)."""

    weights: list[torch.Tensor]
    As: list[torch.Tensor]
    Bs: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    qtensors: list[torch.Tensor | None]
    ints: list[int]
    scalings: list[float]


def pack(lws) -> Packed:
    """:class:`Packed` of the linears ``lws`` (tensors shared, not copied)."""
    out = Packed([], [], [], [], [], [], [])
    for lw in lws:
        state = lw._state()
        base_out, base_in = lw._base_shape()
        rows = (-1, -1) if lw.rows is None else (lw.rows.start, lw.rows.stop)
        quant = [-1, -1, -1, -1, -1]
        qt = [None] * QTENSORS
        if state is not None:
            nested = state.state2 if getattr(state, "nested", False) else None
            quant = [state.blocksize, -1 if nested is None else nested.blocksize,
                     _QUANT_TYPES.index(state.quant_type), _DTYPES.index(state.dtype),
                     -1 if nested is None else _DTYPES.index(nested.dtype)]
            qt = [state.absmax, state.code, None, None, None]
            if nested is not None:
                offset = state.offset if isinstance(state.offset, torch.Tensor) else torch.tensor(
                    float(state.offset), device=state.absmax.device)
                qt[2:] = [offset, nested.absmax, nested.code]
        out.weights.append(lw.weight)
        out.As.append(lw.A)
        out.Bs.append(lw.B)
        out.biases.append(lw.bias)
        out.qtensors.extend(qt)
        out.ints.extend([lw.shape[0], *rows, base_out, base_in, *quant])
        out.scalings.append(lw.scaling)
    return out


def out_features(ints: list[int]) -> list[int]:
    """Each linear's output width, from :attr:`Packed.ints` (what the fake functions need)."""
    return [ints[i] for i in range(0, len(ints), INTS)]


def _state(fields: dict, qt: list):
    from bitsandbytes.functional import QuantState  # lazy: only 4-bit bases need it

    nested = None
    if fields["blocksize2"] >= 0:
        nested = QuantState(absmax=qt[3], code=qt[4], blocksize=fields["blocksize2"],
                            dtype=_DTYPES[fields["dtype2"]])
    return QuantState(absmax=qt[0], shape=torch.Size((fields["base_out"], fields["base_in"])), code=qt[1],
                      blocksize=fields["blocksize"], quant_type=_QUANT_TYPES[fields["quant_type"]],
                      dtype=_DTYPES[fields["dtype"]], offset=qt[2], state2=nested)


def unpack(weights, As, Bs, biases, qtensors, ints, scalings) -> list[LoraWeights]:
    """The :class:`LoraWeights` that :func:`pack` flattened (tensors shared)."""
    lws = []
    for i in range(len(weights)):
        fields = dict(zip(_FIELDS, ints[INTS * i:INTS * (i + 1)]))
        qt = list(qtensors[QTENSORS * i:QTENSORS * (i + 1)])
        state = _state(fields, qt) if fields["quant_type"] >= 0 else None
        rows = None if fields["rows_start"] < 0 else slice(fields["rows_start"], fields["rows_stop"])
        lws.append(LoraWeights(weight=weights[i], A=As[i], B=Bs[i], scaling=scalings[i], bias=biases[i],
                               quant_state=state, rows=rows))
    return lws
