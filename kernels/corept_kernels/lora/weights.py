"""The weights of one LoRA-wrapped linear, and duck-typed readers for peft LoRA layers.

One LoRA linear computes ``y = x W^T + scaling * (x A^T) B^T (+ bias)`` with a frozen base ``W``
``[out, in]`` (a float tensor or a bitsandbytes 4-bit ``Params4bit``) and trainable ``A`` ``[r, in]``
and ``B`` ``[out, r]``. Nothing here imports peft or transformers; bitsandbytes is imported only
when a 4-bit weight is dequantized.

A fused projection (one linear whose output is split, e.g. a ``gate_up_proj`` ``[2F, H]`` whose
``y.chunk(2, -1)`` halves are the MLP's gate and up) is described by row windows:
:meth:`LoraWeights.row_split` gives one :class:`LoraWeights` per part, sharing ``A`` and slicing
``B`` and the base weight, each remembering the linear it was cut from (:attr:`LoraWeights.whole`).
A fused function handed all the windows of one linear (:func:`split_whole`) runs that linear once,
as peft does (one base product, one branch, one backward for the whole output); windows used
apart run as linears of their own, and autograd sums their gradients into the one ``A`` and ``B``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class LoraWeights:
    """One LoRA linear: ``y = x W^T + scaling * (x A^T) B^T + bias``.

    :param weight: frozen base weight ``[out, in]`` (bf16/fp16/fp32), or a bitsandbytes
        ``Params4bit`` (nf4/fp4, any double-quant setting) dequantized on every use.
    :param A: ``lora_A`` weight ``[r, in]`` (trainable).
    :param B: ``lora_B`` weight ``[out, r]`` (trainable).
    :param scaling: ``lora_alpha / r`` (or the rsLoRA value), a Python float.
    :param bias: optional base bias ``[out]``; ``None`` on peft's fast path. If it requires grad,
        its gradient is computed.
    :param quant_state: bitsandbytes ``QuantState`` overriding ``weight.quant_state`` (for weights
        whose state lives on the module, as under FSDP); ``None`` otherwise.
    :param rows: the window of the base weight's output rows this linear is (``weight`` holding
        them all; ``B`` and ``bias`` are the window's already), or ``None`` for all of them. Made
        by :meth:`row_split`.

    ``whole`` (not a constructor argument): for a window made by :meth:`row_split`, the
    :class:`LoraWeights` of the whole linear it was cut from; ``None`` otherwise, and on any copy
    made with ``dataclasses.replace`` (a changed window is no longer known to be one).
    """

    weight: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    bias: torch.Tensor | None = None
    quant_state: Any = None
    rows: slice | None = None
    whole: LoraWeights | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scaling = float(self.scaling)
        r = self.rows
        if r is not None:
            full = self._base_shape()[0]
            if not (isinstance(r.start, int) and isinstance(r.stop, int) and r.step in (None, 1)
                    and 0 <= r.start < r.stop <= full):
                raise ValueError(f"rows must be a slice(start, stop) with 0 <= start < stop <= {full}, got {r!r}")
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"A must be [r, in] and B [out, r]; got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}")
        out_f, in_f = self.shape
        if self.A.shape[1] != in_f or self.B.shape[0] != out_f:
            raise ValueError(f"base weight is [{out_f}, {in_f}] but A is {tuple(self.A.shape)}, B {tuple(self.B.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (out_f,):
            raise ValueError(f"bias must be [{out_f}], got {tuple(self.bias.shape)}")
        if not self.is_4bit and self.weight.requires_grad:
            raise ValueError("base weight requires grad: the fused LoRA path never computes it; freeze it")

    def _state(self):
        return self.quant_state if self.quant_state is not None else getattr(self.weight, "quant_state", None)

    @property
    def is_4bit(self) -> bool:
        """True when the base weight is bitsandbytes 4-bit (has a quant state)."""
        return self._state() is not None

    def _base_shape(self) -> tuple[int, int]:
        """``(out, in)`` of the whole base weight (dequantized shape for 4-bit), window aside."""
        if self.is_4bit:
            out_f, in_f = self._state().shape
            return int(out_f), int(in_f)
        if self.weight.dim() != 2:
            raise ValueError(f"base weight must be [out, in], got {tuple(self.weight.shape)}")
        return int(self.weight.shape[0]), int(self.weight.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of this linear: the base weight's, or its row window's."""
        out_f, in_f = self._base_shape()
        return (out_f if self.rows is None else self.rows.stop - self.rows.start), in_f

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight ``[out, in]`` (its row window) in ``dtype``, detached.

        A float weight's window is a row view (no copy when ``dtype`` is the weight's). 4-bit
        weights are dequantized here (a fresh buffer each call: callers drop it as soon as the
        matmul is done, so it never lives from forward to backward); a window of one is a view of
        the *whole* dequantized ``[out_total, in]`` buffer, so each use of a part of a fused
        projection holds the whole projection's dense weight transiently (made once per window
        used apart; windows run as their whole linear, as ``lora_mlp`` runs gate/up halves, make
        it once).
        """
        w = self._dense_whole(dtype)
        return w if self.rows is None else w[self.rows]

    def _dense_whole(self, dtype: torch.dtype) -> torch.Tensor:
        state = self._state()
        if state is None:
            w = self.weight.detach()
            return w if w.dtype == dtype else w.to(dtype)
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("4-bit weight was repacked for bitsandbytes' CPU inference kernel "
                             "(an eval forward with support_avx512bf16_for_cpu=True); it cannot be dequantized here")
        import bitsandbytes.functional as bnbF  # lazy: only 4-bit bases need it

        w = bnbF.dequantize_4bit(self.weight.data, state)
        return w if w.dtype == dtype else w.to(dtype)

    def row_split(self, sizes: int | Sequence[int]) -> list[LoraWeights]:
        """This linear's output rows as consecutive windows of ``sizes`` rows (summing to ``out``),
        or, for an int ``n``, as ``n`` equal windows (as ``Tensor.chunk(n)`` would split ``y``).

        For a fused projection with one LoRA adapter, e.g. ``gate_up_proj`` (``W`` ``[2F, H]``,
        ``A`` ``[r, H]``, ``B`` ``[2F, r]``): ``gate, up = lw.row_split(2)`` (or ``[F, F]``) gives
        ``gate`` = ``(W[:F], A, B[:F])`` and ``up`` = ``(W[F:], A, B[F:])``, ready for
        :func:`~corept_kernels.lora.lora_mlp`. Every part shares ``A`` (the same tensor) and takes
        a row view of ``B`` and ``bias``, so gradients reach the one ``A`` (the sum of the parts'
        contributions) and the one ``B``; the base weight is windowed without a copy (see
        :meth:`dense_weight` for a 4-bit one). Each part's :attr:`whole` is this linear (or, for
        windows of a window, the linear that one was cut from); the fused functions run windows
        that together cover their whole linear as that one linear (:func:`split_whole`).
        """
        out_f = self.shape[0]
        if isinstance(sizes, int):
            if sizes <= 0 or out_f % sizes:
                raise ValueError(f"row_split({sizes}): out_features={out_f} is not a positive multiple of it")
            sizes = [out_f // sizes] * sizes
        if any(int(n) <= 0 for n in sizes) or sum(int(n) for n in sizes) != out_f:
            raise ValueError(f"row_split sizes {list(sizes)} must be positive and sum to out_features={out_f}")
        base = 0 if self.rows is None else self.rows.start
        whole = self if self.rows is None else self.whole
        parts, a = [], 0
        for n in sizes:
            b = a + int(n)
            part = dataclasses.replace(self, B=self.B[a:b], bias=None if self.bias is None else self.bias[a:b],
                                       rows=slice(base + a, base + b))
            part.whole = whole
            parts.append(part)
            a = b
        return parts


def split_whole(parts: Sequence[LoraWeights]) -> tuple[LoraWeights, list[slice]] | None:
    """``(whole, cols)`` when ``parts`` are row windows (:meth:`LoraWeights.row_split`) that
    together cover one whole linear, each once, in any order: ``whole`` is that linear
    (``W`` ``[out, in]``, ``A`` ``[r, in]``, ``B`` ``[out, r]``) and ``cols[i]`` the columns of its
    output ``[N, out]`` that are part ``i``'s output. ``None`` for anything else (separate linears,
    windows of different linears, a partial cover), which then runs part by part.

    The parts must still be what :meth:`~LoraWeights.row_split` made: the same base weight,
    quant state, ``A`` tensor and scaling as ``whole`` (``dataclasses.replace`` drops ``whole``, so
    a modified copy never matches).
    """
    whole = parts[0].whole if parts else None
    if whole is None or whole.rows is not None:
        return None
    for p in parts:
        if (p.whole is not whole or p.rows is None or p.weight is not whole.weight or p.A is not whole.A
                or p.quant_state is not whole.quant_state or p.scaling != whole.scaling
                or (p.bias is None) != (whole.bias is None)):
            return None
    spans = sorted((p.rows.start, p.rows.stop) for p in parts)
    ends = [0] + [stop for _, stop in spans]
    if any(start != end for (start, _), end in zip(spans, ends)) or ends[-1] != whole.shape[0]:
        return None
    return whole, [p.rows for p in parts]


# ----------------------------------------------------------------------------- peft duck typing


def _base_layer(module):
    base = module
    while hasattr(base, "base_layer"):
        base = base.base_layer
    return base


def _active_name(module) -> tuple[str | None, str | None]:
    """(adapter name, None) for the one active LoRA adapter of ``module``, or (None, reason)."""
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", "default")
    if isinstance(active, str):
        active = [active]
    present = [a for a in active if a in module.lora_A]
    if not present:
        return None, "no active LoRA adapter on this layer"
    if len(present) > 1:
        return None, f"{len(present)} active adapters {present}: fused path takes exactly one"
    return present[0], None


def _base_weight_reason(base) -> str | None:
    weight = getattr(base, "weight", None)
    kind = type(base).__name__
    if getattr(base, "qweight", None) is not None:
        return f"quantized base {kind} (qweight: GPTQ/AWQ-style) is not supported"
    if weight is None:
        return f"base layer {kind} has no weight"
    if hasattr(weight, "CB") or hasattr(weight, "SCB") or type(weight).__name__ == "Int8Params":
        return f"8-bit base ({kind}) is not supported: fused path takes float or 4-bit bases"
    state = getattr(weight, "quant_state", None)
    if state is None:
        state = getattr(base, "quant_state", None)
    if state is not None or type(weight).__name__ == "Params4bit":
        if state is None:
            return "4-bit base weight is not quantized yet (no quant_state; move it to its device first)"
        if getattr(state, "quant_type", None) not in ("nf4", "fp4"):
            return f"4-bit quant_type {getattr(state, 'quant_type', None)!r} is not nf4/fp4"
        if getattr(state, "packing_format_for_cpu", False):
            return ("4-bit weight repacked for bitsandbytes' CPU inference kernel; set "
                    "support_avx512bf16_for_cpu=False on Linear4bit modules before any eval forward")
        return None
    if not isinstance(base, torch.nn.Linear):
        return f"unsupported base layer type {kind}: fused path takes nn.Linear or bitsandbytes Linear4bit"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in _FLOAT_DTYPES:
        return f"unsupported base weight {type(weight).__name__} {getattr(weight, 'dtype', None)}"
    if weight.requires_grad:
        return "base weight requires grad: fused path trains only lora_A and lora_B"
    return None


def lora_fast_path_reason(module, *, allow_bias: bool = False) -> str | None:
    """Why the fused LoRA path cannot replace this peft LoRA linear, or ``None`` when it can.

    Duck-typed on peft's ``LoraLayer`` attributes (``lora_A``, ``lora_B``, ``scaling``,
    ``lora_dropout``, ``base_layer``, ``active_adapters``, ``merged``, ``disable_adapters``,
    ``use_dora``/``lora_variant``, ``lora_bias``, ``fan_in_fan_out``); works for
    ``peft.tuners.lora.Linear`` and its bitsandbytes ``Linear4bit`` variant.

    :param allow_bias: accept a base-layer bias (the fused functions add it, and train it if it
        requires grad). Off by default: the fast path is bias-free, as in the brief's contract.
    :returns: a one-line reason fit for a log, or ``None``.
    """
    for attr in ("lora_A", "lora_B", "scaling", "base_layer"):
        if not hasattr(module, attr):
            return f"{type(module).__name__} is not a peft LoRA linear (no {attr!r})"
    if getattr(module, "disable_adapters", False):
        return "adapters are disabled on this layer: the base layer runs alone"
    if getattr(module, "merged", False):
        return "adapter is merged into the base weight: nothing to fuse"
    name, reason = _active_name(module)
    if reason:
        return reason
    if getattr(module, "use_dora", {}).get(name, False) or name in getattr(module, "lora_magnitude_vector", {}):
        return "DoRA (use_dora=True): fused path does plain LoRA only"
    variant = getattr(module, "lora_variant", {}).get(name)
    if variant is not None:
        return f"LoRA variant {type(variant).__name__}: fused path does plain LoRA only"
    dropout = module.lora_dropout[name] if hasattr(module, "lora_dropout") else None
    if dropout is not None and not isinstance(dropout, torch.nn.Identity):
        p = getattr(dropout, "p", None)
        if p is None:
            return f"lora_dropout module {type(dropout).__name__}: fused path needs dropout 0"
        if p != 0:
            return f"lora_dropout={p}: fused path needs dropout 0"
    if getattr(module, "lora_bias", {}).get(name, False):
        return "lora_bias=True (bias on lora_B): fused path has no LoRA bias"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style [in, out] base weight): not supported"
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    for label, lin in (("lora_A", lora_a), ("lora_B", lora_b)):
        w = getattr(lin, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in _FLOAT_DTYPES:
            return f"{label} is a {type(lin).__name__}, not a float linear"
        if getattr(lin, "bias", None) is not None:
            return f"{label} has a bias: fused path has no LoRA bias"
    base = _base_layer(module)
    reason = _base_weight_reason(base)
    if reason:
        return reason
    if getattr(base, "bias", None) is not None and not allow_bias:
        return "base layer has bias: fused path needs no bias (allow_bias=True adds and trains it)"
    return None


def lora_weights_from_peft(module, *, allow_bias: bool = False) -> LoraWeights:
    """The :class:`LoraWeights` of a peft LoRA linear's active adapter (tensors shared, not copied).

    :raises ValueError: with :func:`lora_fast_path_reason`'s reason when the fused path does not apply.
    """
    reason = lora_fast_path_reason(module, allow_bias=allow_bias)
    if reason is not None:
        raise ValueError(f"fused LoRA path does not apply: {reason}")
    return read_lora_weights(module)


def read_lora_weights(module) -> LoraWeights:
    """:func:`lora_weights_from_peft` without its check, for callers that have just run
    :func:`lora_fast_path_reason` on ``module`` (the check costs about as much as the read, and a
    training step makes both for every LoRA linear in every forward)."""
    name, _ = _active_name(module)
    base = _base_layer(module)
    weight = base.weight
    state = None
    if getattr(weight, "quant_state", None) is None and getattr(base, "quant_state", None) is not None:
        state = base.quant_state
    return LoraWeights(weight=weight, A=module.lora_A[name].weight, B=module.lora_B[name].weight,
                       scaling=float(module.scaling[name]), bias=getattr(base, "bias", None), quant_state=state)
