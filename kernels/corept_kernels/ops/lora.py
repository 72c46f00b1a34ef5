"""The fused LoRA paths as torch custom operators: the form ``torch.compile`` traces.

Two operator pairs run the same functions as the eager ``autograd.Function`` s:
``lora_linears_fwd``/``_bwd`` (k linears on one input: q/k/v or o;
:func:`~corept_kernels.lora.autograd.shared_backward`) and ``lora_mlp_fwd``/``_bwd``
(:func:`~corept_kernels.lora.mlp.mlp_forward`, :func:`~corept_kernels.lora.mlp.mlp_backward`).
The linears arrive flattened (:mod:`corept_kernels.lora.packing`). Inputs are 2-D: ``x2``
``[N, in]``; callers reshape around the operators.

Differences from eager, both from the operator contract: outputs may not alias inputs or each other,
so outputs sharing a storage are copied (:func:`_distinct`: the ``dA`` of linears sharing one
``dxa^T x`` product, ``[r, in]`` each);
``lora_mlp_bwd`` declares that it overwrites the saved gate/up projections (eager does the same
without saying so), which an uncompiled graph pays for with a copy of them before the call
(inductor's re-inplacing pass removes it).
"""
from __future__ import annotations

import torch

from corept_kernels.lora.autograd import _forward_shared, lora_dtype, shared_backward
from corept_kernels.lora.mlp import MlpLinears, mlp_backward, mlp_forward
from corept_kernels.lora.packing import out_features, unpack
from corept_kernels.ops.common import unused

Tensors = list[torch.Tensor]
OptTensors = list[torch.Tensor | None]


def _empty0(like: torch.Tensor) -> torch.Tensor:
    return unused(like)


def _own(ts, likes) -> Tensors:
    """Operator outputs of optional gradients: ``None`` -> :func:`~corept_kernels.ops.common.unused`."""
    return [_empty0(like) if t is None else t for t, like in zip(ts, likes)]


def _distinct(outs: Tensors, inputs: tuple) -> Tensors:
    """``outs`` as the operator contract wants them: any output sharing storage with an input or an
    earlier output is replaced by a copy (``dA`` s sliced out of one ``dxa^T x`` product, ``q/k/v``
    column windows of one GEMM). Storages are compared, not ``._base``: on CUDA the slices reach
    here without view metadata (torch 2.11 under inductor), and torch's own check compares storages."""
    taken = {t.untyped_storage().data_ptr() for t in _flat_tensors(inputs) if t.numel()}
    res = []
    for t in outs:
        if t.numel():
            if t.untyped_storage().data_ptr() in taken:
                t = t.clone()
            taken.add(t.untyped_storage().data_ptr())
        res.append(t)
    return res


def _flat_tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _mlp(lws, cols: list[int]) -> MlpLinears:
    if not cols:
        return MlpLinears(tuple(lws[:2]), lws[2])
    return MlpLinears((lws[0],), lws[1], (slice(cols[0], cols[1]), slice(cols[2], cols[3])))


# ----------------------------------------------------------------- k linears sharing one input

@torch.library.custom_op("corept_kernels::lora_linears_fwd", mutates_args=())
def _linears_fwd(x2: torch.Tensor, weights: Tensors, As: Tensors, Bs: Tensors, biases: OptTensors,
                 qtensors: OptTensors, ints: list[int], scalings: list[float]) -> tuple[Tensors, torch.Tensor]:
    lws = unpack(weights, As, Bs, biases, qtensors, ints, scalings)
    outs, xa = _forward_shared(x2, lws, As, Bs, x2.dtype)
    *outs, xa = _distinct([*outs, xa], (x2, weights, As, Bs, biases, qtensors))
    return outs, xa


@_linears_fwd.register_fake
def _(x2, weights, As, Bs, biases, qtensors, ints, scalings):
    n = x2.shape[0]
    xa = x2.new_empty((n, sum(A.shape[0] for A in As)), dtype=lora_dtype(As[0], x2.dtype))
    return [x2.new_empty((n, o)) for o in out_features(ints)], xa


@torch.library.custom_op("corept_kernels::lora_linears_bwd", mutates_args=())
def _linears_bwd(douts: Tensors, x2: torch.Tensor, xa: torch.Tensor, weights: Tensors, As: Tensors, Bs: Tensors,
                 biases: OptTensors, qtensors: OptTensors, ints: list[int], scalings: list[float], need_x: bool,
                 need_A: list[bool], need_B: list[bool], need_b: list[bool]
                 ) -> tuple[torch.Tensor, Tensors, Tensors, Tensors]:
    lws = unpack(weights, As, Bs, biases, qtensors, ints, scalings)
    dx, dAs, dBs, dbs = shared_backward(douts, x2, xa, lws, As, Bs, need_x, need_A, need_B, need_b)
    k = len(As)
    flat = _distinct([_empty0(x2) if dx is None else dx, *_own(dAs, As), *_own(dBs, Bs), *_own(dbs, As)],
                     (douts, x2, xa, weights, As, Bs, biases, qtensors))
    return flat[0], flat[1:1 + k], flat[1 + k:1 + 2 * k], flat[1 + 2 * k:]


@_linears_bwd.register_fake
def _(douts, x2, xa, weights, As, Bs, biases, qtensors, ints, scalings, need_x, need_A, need_B, need_b):
    def grads(ts, needs):
        return [torch.empty_like(t) if n and t is not None else _empty0(x2) for t, n in zip(ts, needs)]
    return (torch.empty_like(x2) if need_x else _empty0(x2)), grads(As, need_A), grads(Bs, need_B), grads(biases, need_b)


def _linears_setup(ctx, inputs, output):
    x2, weights, As, Bs, biases, qtensors, ints, scalings = inputs
    ctx.k, ctx.ints, ctx.scalings, ctx.device_type = len(As), ints, scalings, x2.device.type
    ctx.lengths = _tensor_lists(inputs)
    ctx.save_for_backward(x2, output[1], *weights, *As, *Bs, *biases, *qtensors)


def _unsaved(saved, k: int):
    """``(x2, saved activation, weights, As, Bs, biases, qtensors)`` from saved tensors laid out
    as the setup functions save them, for ``k`` linears."""
    x2, act, *rest = saved
    return x2, act, rest[:k], rest[k:2 * k], rest[2 * k:3 * k], rest[3 * k:4 * k], rest[4 * k:]


def _tensor_lists(inputs) -> list[int | None]:
    """Per operator input: its length when it is a list of tensors (autograd then wants a list of
    gradients for it, ``None`` entries allowed), else ``None`` (one gradient: ``None``)."""
    return [len(a) if isinstance(a, list) and all(isinstance(t, torch.Tensor) for t in a) else None
            for a in inputs]


def _structured(lengths: list[int | None], grads: dict) -> tuple:
    """The backward's return: ``grads[i]`` for input ``i`` where given, shaped as autograd wants."""
    out = []
    for i, n in enumerate(lengths):
        g = grads.get(i)
        out.append(([None] * n if g is None else list(g)) if n is not None else (g if not isinstance(g, list) else None))
    return tuple(out)


def _needs(flags, k: int) -> list[bool]:
    return [bool(f) for f in flags] if isinstance(flags, (list, tuple)) else [bool(flags)] * k


def _grads(ts, needs):
    return [t if n else None for t, n in zip(ts, needs)]


def _linears_backward(ctx, douts, _dxa):
    x2, xa, weights, As, Bs, biases, qtensors = _unsaved(ctx.saved_tensors, ctx.k)
    need = ctx.needs_input_grad
    need_A, need_B = _needs(need[2], ctx.k), _needs(need[3], ctx.k)
    need_b = [n and b is not None for n, b in zip(_needs(need[4], ctx.k), biases)]
    d2 = [d.to(x2.dtype) for d in douts]
    with torch.autocast(ctx.device_type, enabled=False):
        dx, dAs, dBs, dbs = _linears_bwd(d2, x2, xa, weights, As, Bs, biases, qtensors, ctx.ints, ctx.scalings,
                                         bool(need[0]), need_A, need_B, need_b)
    return _structured(ctx.lengths, {0: dx if need[0] else None, 2: _grads(dAs, need_A), 3: _grads(dBs, need_B),
                                     4: _grads(dbs, need_b)})


_linears_fwd.register_autograd(_linears_backward, setup_context=_linears_setup)


# ----------------------------------------------------------------- the MLP

@torch.library.custom_op("corept_kernels::lora_mlp_fwd", mutates_args=())
def _mlp_fwd(x2: torch.Tensor, weights: Tensors, As: Tensors, Bs: Tensors, biases: OptTensors, qtensors: OptTensors,
             ints: list[int], scalings: list[float], activation: str, cols: list[int]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Tensors]:
    lin = _mlp(unpack(weights, As, Bs, biases, qtensors, ints, scalings), cols)
    y, xa_f, xa_d, outs = mlp_forward(x2, activation, lin, As, Bs)
    y, xa_f, xa_d, *outs = _distinct([y, xa_f, xa_d, *outs], (x2, weights, As, Bs, biases, qtensors))
    return y, xa_f, xa_d, outs


@_mlp_fwd.register_fake
def _(x2, weights, As, Bs, biases, qtensors, ints, scalings, activation, cols):
    n, widths = x2.shape[0], out_features(ints)
    ldt = lora_dtype(As[0], x2.dtype)
    front = len(As) - 1
    xa_f = x2.new_empty((n, sum(A.shape[0] for A in As[:front])), dtype=ldt)
    xa_d = x2.new_empty((n, As[-1].shape[0]), dtype=ldt)
    return x2.new_empty((n, widths[-1])), xa_f, xa_d, [x2.new_empty((n, w)) for w in widths[:front]]


_MLP_LINEARS = 3  # gate, up, down; or gate_up, down (then the third slot of each list is empty)
_Grads10 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                 torch.Tensor, torch.Tensor, torch.Tensor]


def _slots(ts: Tensors, x2: torch.Tensor) -> Tensors:
    return list(ts) + [_empty0(x2) for _ in range(_MLP_LINEARS - len(ts))]


# An operator that declares a mutation cannot return lists (functionalization refuses it), so the
# gradients come back as ten tensors: dx, then dA, dB and db of three linear slots.
@torch.library.custom_op("corept_kernels::lora_mlp_bwd", mutates_args=("out0", "out1"))
def _mlp_bwd(dy2: torch.Tensor, x2: torch.Tensor, xa_f: torch.Tensor, xa_d: torch.Tensor, out0: torch.Tensor,
             out1: torch.Tensor | None, weights: Tensors, As: Tensors, Bs: Tensors, biases: OptTensors,
             qtensors: OptTensors, ints: list[int], scalings: list[float], activation: str, cols: list[int],
             need_x: bool, need_A: list[bool], need_B: list[bool], need_b: list[bool]) -> _Grads10:
    lin = _mlp(unpack(weights, As, Bs, biases, qtensors, ints, scalings), cols)
    outs = [out0] if out1 is None else [out0, out1]
    dx, dAs, dBs, dbs = mlp_backward(dy2, x2, xa_f, xa_d, outs, activation, lin, As, Bs, need_x,
                                     need_A, need_B, need_b)
    grads = [(_empty0(x2) if dx is None else dx), *_slots(_own(dAs, As), x2), *_slots(_own(dBs, Bs), x2),
             *_slots(_own(dbs, As), x2)]
    return tuple(_distinct(grads, (dy2, x2, xa_f, xa_d, out0, out1, weights, As, Bs, biases, qtensors)))


@_mlp_bwd.register_fake
def _(dy2, x2, xa_f, xa_d, out0, out1, weights, As, Bs, biases, qtensors, ints, scalings, activation, cols,
      need_x, need_A, need_B, need_b):
    def grads(ts, needs):
        return _slots([torch.empty_like(t) if n and t is not None else _empty0(x2) for t, n in zip(ts, needs)], x2)
    return ((torch.empty_like(x2) if need_x else _empty0(x2)), *grads(As, need_A), *grads(Bs, need_B),
            *grads(biases, need_b))


def _mlp_setup(ctx, inputs, output):
    x2, weights, As, Bs, biases, qtensors, ints, scalings, activation, cols = inputs
    ctx.k, ctx.ints, ctx.scalings, ctx.device_type = len(As), ints, scalings, x2.device.type
    ctx.activation, ctx.cols, ctx.front = activation, cols, len(output[3])
    ctx.lengths = _tensor_lists(inputs)
    ctx.save_for_backward(x2, output[1], *weights, *As, *Bs, *biases, *qtensors, output[2], *output[3])


def _mlp_backward(ctx, dy, _dxa_f, _dxa_d, _douts):
    saved = ctx.saved_tensors
    tail = 1 + ctx.front  # xa_d and the front outputs, saved after the packed linears
    x2, xa_f, weights, As, Bs, biases, qtensors = _unsaved(saved[:-tail], ctx.k)
    xa_d, outs = saved[-tail], list(saved[-ctx.front:])
    need = ctx.needs_input_grad
    need_A, need_B = _needs(need[2], ctx.k), _needs(need[3], ctx.k)
    need_b = [n and b is not None for n, b in zip(_needs(need[4], ctx.k), biases)]
    with torch.autocast(ctx.device_type, enabled=False):
        dx, *g = _mlp_bwd(dy.to(x2.dtype), x2, xa_f, xa_d, outs[0], outs[1] if len(outs) > 1 else None, weights,
                          As, Bs, biases, qtensors, ctx.ints, ctx.scalings, ctx.activation, ctx.cols,
                          bool(need[0]), need_A, need_B, need_b)
    k = ctx.k
    dAs, dBs, dbs = g[:k], g[_MLP_LINEARS:_MLP_LINEARS + k], g[2 * _MLP_LINEARS:2 * _MLP_LINEARS + k]
    return _structured(ctx.lengths, {0: dx if need[0] else None, 2: _grads(dAs, need_A), 3: _grads(dBs, need_B),
                                     4: _grads(dbs, need_b)})


_mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup)
