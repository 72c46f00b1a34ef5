"""The experts' linear of a mixture-of-experts layer, with per-expert LoRA: :func:`expert_linear`.

Tokens arrive sorted by expert; ``offsets`` ``[E]`` int32 holds cumulative end offsets
(``offsets[e]`` = rows of experts ``0..e``, ``offsets[-1] == N``; ``torch._grouped_mm``'s ``offs``).
For expert ``e`` with rows ``x_e``::

    y_e = x_e @ W_e (+ scaling * (x_e @ A_e^T) @ B_e^T) (+ bias_e)

``W_e = weight[e].T`` for ``weight [E, M, K]`` (``transposed=False``: the layout of most MoE
models), ``weight[e]`` for ``weight [E, K, M]`` (``transposed=True``); ``A = lora_a [E, r, K]``,
``B = lora_b [E, M, r]`` (peft's per-expert factors). The weight is never merged with ``B @ A``.

Every GEMM, forward and backward, is one grouped GEMM over ``offsets``
(:mod:`corept_kernels.grouped_gemm`: ``torch._grouped_mm`` where its fast path applies, else one
Triton launch). The forward saves ``x`` and ``xa = x @ A^T`` (``[N, r]``, rounded to ``x``'s dtype
where peft rounds ``lora_A``'s output). The backward computes the gradients autograd asks for:
``dx``, ``dA``, ``dB``, and ``dW`` / ``dbias`` only when the weight / bias require grad.

Three forms run the same functions: the eager ``autograd.Function``, the custom operators
``corept_kernels::expert_linear_fwd`` / ``_bwd`` (fake functions, registered autograd:
``torch.compile`` traces them without a graph break) and the pure-torch twin
:func:`expert_linear_reference`, a loop over experts (a host sync for the bounds; float64, empty
inputs, ``reference_only()``).
"""
from __future__ import annotations

from typing import Callable

import torch

from corept_kernels import capabilities
from corept_kernels.capabilities import KernelInfo, unsupported_tensors
from corept_kernels.grouped_gemm import ragged_mm, rows_mm
from corept_kernels.ops.common import unused

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- the twin


def expert_linear_reference(x: Tensor, offsets: Tensor, weight: Tensor, lora_a: Tensor | None = None,
                            lora_b: Tensor | None = None, scaling: float = 1.0, bias: Tensor | None = None,
                            transposed: bool = False) -> Tensor:
    """:func:`expert_linear` as a loop over experts with ``torch.matmul`` (peft's rounding points:
    ``lora_B(lora_A(x)) * scaling`` added to the base output). Checks ``offsets`` (a host sync)."""
    ends = [int(v) for v in offsets.tolist()]
    if any(b < a for a, b in zip([0] + ends, ends)) or (ends and ends[-1] != x.shape[0]):
        raise ValueError(f"offsets must be non-decreasing and end at the row count {x.shape[0]}, got {ends}")
    outs, start = [], 0
    for e, end in enumerate(ends):
        xe = x[start:end]
        ye = xe @ (weight[e] if transposed else weight[e].t())
        if lora_a is not None:
            ye = ye + ((xe @ lora_a[e].t()) @ lora_b[e].t()) * scaling
        if bias is not None:
            ye = ye + bias[e]
        outs.append(ye)
        start = end
    return torch.cat(outs)


# ----------------------------------------------------------------------------- the launches


def expert_linear_forward(x: Tensor, offsets: Tensor, weight: Tensor, lora_a: Tensor | None, lora_b: Tensor | None,
                          bias: Tensor | None, scaling: float, transposed: bool) -> tuple[Tensor, Tensor | None]:
    """``(y [N, M], xa [N, r] or None)``: two grouped GEMMs with LoRA (``xa``, then base and
    up-projection in one), one without."""
    w_kn = weight if transposed else weight.transpose(1, 2)  # [E, K, M]
    if lora_a is None:
        return rows_mm(x, w_kn, offsets, bias=bias), None
    xa = rows_mm(x, lora_a.transpose(1, 2), offsets)
    return rows_mm(x, w_kn, offsets, a2=xa, b2=lora_b.transpose(1, 2), beta=scaling, bias=bias), xa


def expert_linear_backward(dy: Tensor, x: Tensor, offsets: Tensor, weight: Tensor, lora_a: Tensor | None,
                           lora_b: Tensor | None, xa: Tensor | None, scaling: float, transposed: bool, need_x: bool,
                           need_w: bool, need_a: bool, need_b: bool, need_bias: bool) -> tuple:
    """``(dx [N, K], dW like weight, dA [E, r, K], dB [E, M, r], dbias [E, M])``, ``None`` where not needed.

    ``dxa = scaling * dy_e @ B_e`` (``[N, r]``, rounded like peft's gradient of ``lora_A``'s output),
    ``dx = dy_e @ W_e^T + dxa @ A_e`` in one launch, then the contractions over each expert's rows.
    """
    has_lora = lora_a is not None
    dxa = rows_mm(dy, lora_b, offsets, alpha=scaling) if has_lora and (need_x or need_a) else None
    dx = dw = da = db = dbias = None
    if need_x:
        w_mk = weight.transpose(1, 2) if transposed else weight  # [E, M, K]
        dx = rows_mm(dy, w_mk, offsets, a2=dxa, b2=lora_a)
    if need_a and has_lora:
        da = ragged_mm(dxa, x, offsets)
    if need_b and has_lora:
        db = ragged_mm(dy, xa, offsets, alpha=scaling)
    if need_w:
        dw = ragged_mm(x, dy, offsets) if transposed else ragged_mm(dy, x, offsets)
    if need_bias:  # row sums of dy per expert: a stride-0 column of ones as the second operand
        dbias = ragged_mm(dy, dy.new_ones(1, 1).expand(dy.shape[0], 1), offsets).squeeze(2)
    return dx, dw, da, db, dbias


def _out_features(weight: Tensor, transposed: bool):
    return weight.shape[2] if transposed else weight.shape[1]


# ----------------------------------------------------------------------------- custom operators


@torch.library.custom_op("corept_kernels::expert_linear_fwd", mutates_args=())
def _fwd_op(x: Tensor, offsets: Tensor, weight: Tensor, lora_a: Tensor | None, lora_b: Tensor | None,
            bias: Tensor | None, scaling: float, transposed: bool) -> tuple[Tensor, Tensor]:
    y, xa = expert_linear_forward(x, offsets, weight, lora_a, lora_b, bias, scaling, transposed)
    return y, unused(x) if xa is None else xa


@_fwd_op.register_fake
def _(x, offsets, weight, lora_a, lora_b, bias, scaling, transposed):
    xa = unused(x) if lora_a is None else x.new_empty((x.shape[0], lora_a.shape[1]))
    return x.new_empty((x.shape[0], _out_features(weight, transposed))), xa


_Grads5 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("corept_kernels::expert_linear_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, offsets: Tensor, weight: Tensor, lora_a: Tensor | None, lora_b: Tensor | None,
            xa: Tensor, scaling: float, transposed: bool, need_x: bool, need_w: bool, need_a: bool, need_b: bool,
            need_bias: bool) -> _Grads5:
    grads = expert_linear_backward(dy, x, offsets, weight, lora_a, lora_b, None if lora_a is None else xa, scaling,
                                   transposed, need_x, need_w, need_a, need_b, need_bias)
    return tuple(unused(x) if g is None else g for g in grads)


@_bwd_op.register_fake
def _(dy, x, offsets, weight, lora_a, lora_b, xa, scaling, transposed, need_x, need_w, need_a, need_b, need_bias):
    E, M = weight.shape[0], _out_features(weight, transposed)
    lora = lora_a is not None
    # contiguous, as the launches return them (an input may be a strided view, e.g. peft's permuted lora_B:
    # empty_like would copy its strides, and AOTAutograd would then view the real gradient wrongly)
    return (x.new_empty(x.shape) if need_x else unused(x), x.new_empty(weight.shape) if need_w else unused(x),
            x.new_empty(lora_a.shape) if need_a and lora else unused(x),
            x.new_empty(lora_b.shape) if need_b and lora else unused(x),
            x.new_empty((E, M)) if need_bias else unused(x))


def _needs(ctx, has_lora: bool, has_bias: bool) -> tuple[bool, bool, bool, bool, bool]:
    """(x, weight, lora_a, lora_b, bias) gradients wanted, from the inputs' order
    ``(x, offsets, weight, lora_a, lora_b, bias, ...)`` of both autograd forms."""
    n = ctx.needs_input_grad
    return bool(n[0]), bool(n[2]), has_lora and bool(n[3]), has_lora and bool(n[4]), has_bias and bool(n[5])


def _setup(ctx, inputs, output):
    x, offsets, weight, lora_a, lora_b, bias, scaling, transposed = inputs
    ctx.scaling, ctx.transposed, ctx.device_type = scaling, transposed, x.device.type
    ctx.has_lora, ctx.has_bias = lora_a is not None, bias is not None
    ctx.save_for_backward(x, offsets, weight, lora_a, lora_b, output[1])


def _op_backward(ctx, dy, _dxa):
    x, offsets, weight, lora_a, lora_b, xa = ctx.saved_tensors
    need = _needs(ctx, ctx.has_lora, ctx.has_bias)
    with torch.autocast(ctx.device_type, enabled=False):
        grads = _bwd_op(dy.to(x.dtype), x, offsets, weight, lora_a, lora_b, xa, ctx.scaling, ctx.transposed, *need)
    dx, dw, da, db, dbias = (g if n else None for g, n in zip(grads, need))
    return dx, None, dw, da, db, dbias, None, None


_fwd_op.register_autograd(_op_backward, setup_context=_setup)


class _ExpertLinearFn(torch.autograd.Function):
    """The eager form (no operator-call overhead); the operators above run the same functions."""

    @staticmethod
    def forward(ctx, x, offsets, weight, lora_a, lora_b, bias, scaling, transposed, stored=None):
        y, xa = expert_linear_forward(x, offsets, weight, lora_a, lora_b, bias, scaling, transposed)
        ctx.scaling, ctx.transposed = scaling, transposed
        ctx.has_lora, ctx.has_bias = lora_a is not None, bias is not None
        # a stored (e.g. 4-bit) frozen weight: keep it, not its dense form, and rebuild that in the backward
        ctx.stored = stored
        ctx.save_for_backward(x, offsets, None if stored is not None else weight, lora_a, lora_b, xa)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, offsets, weight, lora_a, lora_b, xa = ctx.saved_tensors
        if ctx.stored is not None:
            weight = ctx.stored[1](ctx.stored[0])
        need = _needs(ctx, ctx.has_lora, ctx.has_bias)
        dx, dw, da, db, dbias = expert_linear_backward(dy.to(x.dtype), x, offsets, weight, lora_a, lora_b, xa,
                                                       ctx.scaling, ctx.transposed, *need)
        return dx, None, dw, da, db, dbias, None, None, None


def _triton(x, offsets, weight, lora_a, lora_b, scaling, bias, transposed, stored=None):
    return _ExpertLinearFn.apply(x, offsets, weight, lora_a, lora_b, bias, float(scaling), bool(transposed), stored)


def _compiled(x, offsets, weight, lora_a, lora_b, scaling, bias, transposed):
    return torch.ops.corept_kernels.expert_linear_fwd(x, offsets, weight, lora_a, lora_b, bias, float(scaling),
                                                      bool(transposed))[0]


# ----------------------------------------------------------------------------- the public function


def _check(x, offsets, weight, lora_a, lora_b, bias, transposed) -> None:
    if x.dim() != 2 or weight.dim() != 3:
        raise ValueError(f"x must be [N, K] and weight [E, ., .], got {tuple(x.shape)} and {tuple(weight.shape)}")
    E = weight.shape[0]
    K, M = (weight.shape[1], weight.shape[2]) if transposed else (weight.shape[2], weight.shape[1])
    if offsets.dim() != 1 or offsets.shape[0] != E or offsets.dtype != torch.int32:
        raise ValueError(f"offsets must be int32 [{E}], got {offsets.dtype} {tuple(offsets.shape)}")
    if x.shape[1] != K:
        raise ValueError(f"x has {x.shape[1]} features, weight {tuple(weight.shape)} "
                         f"(transposed={transposed}) takes {K}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must have one dtype")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b come together")
    if lora_a is not None:
        r = lora_a.shape[1]
        if tuple(lora_a.shape) != (E, r, K) or tuple(lora_b.shape) != (E, M, r):
            raise ValueError(f"lora_a must be [{E}, r, {K}] and lora_b [{E}, {M}, r], got {tuple(lora_a.shape)} "
                             f"and {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (E, M):
        raise ValueError(f"bias must be [{E}, {M}], got {tuple(bias.shape)}")


def expert_linear(x: Tensor, offsets: Tensor, weight: Tensor, lora_a: Tensor | None = None,
                  lora_b: Tensor | None = None, scaling: float = 1.0, bias: Tensor | None = None,
                  transposed: bool = False, dequantize: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The experts' linear over tokens sorted by expert, with optional per-expert LoRA and bias.

    :param x: ``[N, K]``, rows grouped by expert (``N`` may be 0).
    :param offsets: ``[E]`` int32 cumulative end offsets; ``offsets[-1] == N`` (experts may have
        no rows). Only the twin checks it (the kernels would need a host sync).
    :param weight: ``[E, M, K]`` (``y_e = x_e @ weight[e].T``), or ``[E, K, M]`` with
        ``transposed=True`` (``y_e = x_e @ weight[e]``); ``x``'s dtype.
    :param lora_a: ``[E, r, K]`` and :param lora_b: ``[E, M, r]``, both or neither:
        ``y_e += scaling * (x_e @ lora_a[e].T) @ lora_b[e].T``. Cast to ``x``'s dtype (as peft's
        ``get_delta_factors`` casts to the parameter's), differentiably.
    :param bias: ``[E, M]``, added to each expert's rows.
    :param dequantize: for a frozen weight stored in another form (a 4-bit parameter):
        ``dequantize(weight)`` is the dense weight described above. The eager kernel path calls it
        in the forward and again in the backward, so the dense weight is never kept between them
        (nor handed to saved-tensor hooks); the reference and compiled paths use it once.
    :returns: ``[N, M]`` in ``x``'s dtype. Differentiable in ``x``, ``weight``, ``lora_a``,
        ``lora_b`` and ``bias``; a frozen weight or bias costs no gradient GEMM.
    """
    stored = None
    if dequantize is not None:
        stored, weight = (weight, dequantize), dequantize(weight)
    _check(x, offsets, weight, lora_a, lora_b, bias, transposed)
    if lora_a is not None:
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    fn, _ = capabilities.dispatch("expert_linear", x, weight, lora_a, lora_b, bias, offsets)
    if stored is not None and fn is _triton:
        return _triton(x, offsets, weight, lora_a, lora_b, scaling, bias, transposed, stored)
    return fn(x, offsets, weight, lora_a, lora_b, scaling, bias, transposed)


def _eligibility(x, weight, lora_a, lora_b, bias, offsets) -> str | None:
    return unsupported_tensors(x, weight, lora_a, lora_b, bias)


capabilities.register(KernelInfo(
    name="expert_linear", triton_fn=_triton, reference_fn=expert_linear_reference, compiled_fn=_compiled,
    eligibility=_eligibility,
    notes="MoE experts' grouped GEMM + per-expert LoRA; torch._grouped_mm for aligned bf16 on sm90/sm100"))
