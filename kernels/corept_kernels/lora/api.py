"""Fused LoRA MLP, QKV and O projections with hand-derived backwards (frozen base, trained A/B).

Each LoRA linear is ``y = x W^T + scaling * (x A^T) B^T``, described by :class:`LoraWeights`; the
base ``W`` may be a float tensor or a bitsandbytes 4-bit ``Params4bit`` (dequantized on the fly in
forward and again in backward, never kept alive between them), or a row window of one (a part of a
fused projection, :meth:`LoraWeights.row_split`). Gradients flow to ``x`` and to every ``A`` and
``B``; never to ``W``. The two row windows of one fused ``gate_up`` linear run as that one linear,
as peft runs it (:mod:`corept_kernels.lora.mlp`).

Compared with peft's LoRA layers these save fewer activations for backward (details and byte counts
in :mod:`corept_kernels.lora.autograd` and :mod:`corept_kernels.lora.mlp`): the MLP keeps ``x``,
the gate/up projections and the ``[N, r]`` products, and recomputes ``act(e) * g`` in backward
inside one fused Triton kernel.
Long calls (gate/up above 2 GiB) run the MLP over row tiles that keep only ``x``
(:mod:`corept_kernels.lora.tiled`).

Use :func:`lora_fast_path_reason` on a peft layer to know whether these apply, and
:func:`lora_weights_from_peft` to read its weights. Matmuls run through torch (cuBLAS on GPU): the
base ones in the input dtype (autocast's dtype inside ``torch.autocast``), the adapter branch in
the adapter dtype promoted with it (peft's numerics; fp32 adapters on a bf16 model: fp32 values
from bf16-operand GEMMs, :mod:`corept_kernels.lora.branch`), with every value rounded where peft
rounds it (:mod:`corept_kernels.lora.autograd`); the MLP's gated activation and the rank-r adds
of fp32 adapters on bf16 are Triton kernels (torch code where Triton cannot run).

Each public function asks :func:`~corept_kernels.capabilities.dispatch` for its path: the fused
one, or its plain-autograd twin (:mod:`corept_kernels.torch_ref.lora`) under
:func:`~corept_kernels.capabilities.reference_only`. Inside ``torch.compile`` the fused path runs
as custom operators (:mod:`corept_kernels.ops.lora`), the linears flattened by
:mod:`corept_kernels.lora.packing`.
"""
from __future__ import annotations

import torch

from corept_kernels import capabilities
from corept_kernels.capabilities import KernelInfo
from corept_kernels.lora.activation import activation_id
from corept_kernels.lora.autograd import LoraSharedInput
from corept_kernels.lora.mlp import LoraMLP, mlp_linears
from corept_kernels.lora.packing import pack
from corept_kernels.lora.tiled import TiledLoraMLP, check_tile_rows, mlp_tile_rows
from corept_kernels.lora.weights import LoraWeights
from corept_kernels.torch_ref import lora as _ref

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # float64: gold references


def _check_input(x: torch.Tensor, lws: tuple[LoraWeights, ...], names: tuple[str, ...]) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be fp32/bf16/fp16/fp64, got {x.dtype}")
    for name, lw in zip(names, lws):
        if not isinstance(lw, LoraWeights):
            raise TypeError(f"{name} must be LoraWeights, got {type(lw).__name__}")
        if lw.shape[1] != x.shape[-1]:
            raise ValueError(f"{name} takes in_features={lw.shape[1]} but x is {tuple(x.shape)}")


def _flat(lws: tuple[LoraWeights, ...]) -> list:
    out = []
    for lw in lws:
        out += [lw.A, lw.B, lw.bias]
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """autocast's dtype when it is on for ``x``'s device, else ``x.dtype``."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _apply(fn, x: torch.Tensor, *args):
    """Run ``fn.apply`` in the compute dtype (:func:`_compute_dtype`; ``x`` is cast first, outside
    the Function, so autograd casts ``dx`` back); autocast is off inside, so every matmul of
    forward and backward sees the same dtype."""
    x = x.to(_compute_dtype(x))
    with torch.autocast(x.device.type, enabled=False):
        return fn.apply(x, *args)


def _lora_mlp_fused(x, gate, up, down, activation="swiglu", tile_rows=None):
    lin = mlp_linears(gate, up, down)
    rows = mlp_tile_rows(x.numel() // max(1, x.shape[-1]), gate.shape[0], _compute_dtype(x).itemsize, tile_rows)
    if rows is not None:
        return _apply(TiledLoraMLP, x, activation, lin, rows, *_flat(lin.linears))
    return _apply(LoraMLP, x, activation, lin, *_flat(lin.linears))


def _lora_qkv_fused(x, q, k, v):
    lws = (q, k, v)
    return _apply(LoraSharedInput, x, lws, *_flat(lws))


def _lora_o_fused(x, o):
    return _apply(LoraSharedInput, x, (o,), *_flat((o,)))[0]


# ---- the forms taken inside torch.compile: the custom operators of corept_kernels.ops.lora

def _mixed_trained_biases(lws) -> bool:
    """Biases present on some linears only, one of them trained: an operator's ``Tensor?[]`` input
    with a ``None`` in it takes no gradients, so such calls keep the eager Function."""
    present = [lw.bias is not None for lw in lws]
    return not all(present) and any(lw.bias is not None and lw.bias.requires_grad for lw in lws)


@torch.compiler.disable
def _eager(fn, x, *args):
    return _apply(fn, x, *args)


def _compiled(op, x: torch.Tensor, lws, *extra):
    """``op`` on ``x`` as ``[N, in]`` in the compute dtype, autocast off (as :func:`_apply`)."""
    x = x.to(_compute_dtype(x))
    p = pack(lws)
    with torch.autocast(x.device.type, enabled=False):
        return x.shape[:-1], op(x.reshape(-1, x.shape[-1]), *p, *extra)


def _lora_mlp_compiled(x, gate, up, down, activation="swiglu", tile_rows=None):
    lin = mlp_linears(gate, up, down)
    rows = mlp_tile_rows(x.numel() // max(1, x.shape[-1]), gate.shape[0], _compute_dtype(x).itemsize, tile_rows)
    if rows is not None:
        # row tiles recompute the MLP inside backward (a graph of their own): no operator form;
        # such long calls (gate/up above MLP_TILE_MIN_BYTES) run eagerly, one graph break each
        return _eager(TiledLoraMLP, x, activation, lin, rows, *_flat(lin.linears))
    if _mixed_trained_biases(lin.linears):
        return _eager(LoraMLP, x, activation, lin, *_flat(lin.linears))
    cols = [] if lin.cols is None else [lin.cols[0].start, lin.cols[0].stop, lin.cols[1].start, lin.cols[1].stop]
    lead, (y, *_) = _compiled(torch.ops.corept_kernels.lora_mlp_fwd, x, lin.linears, activation, cols)
    return y.view(*lead, y.shape[-1])


def _lora_qkv_compiled(x, q, k, v):
    if _mixed_trained_biases((q, k, v)):
        return _eager(LoraSharedInput, x, (q, k, v), *_flat((q, k, v)))
    lead, (outs, _) = _compiled(torch.ops.corept_kernels.lora_linears_fwd, x, (q, k, v))
    return tuple(y.view(*lead, y.shape[-1]) for y in outs)


def _lora_o_compiled(x, o):
    lead, (outs, _) = _compiled(torch.ops.corept_kernels.lora_linears_fwd, x, (o,))
    return outs[0].view(*lead, outs[0].shape[-1])


def lora_mlp(x: torch.Tensor, gate: LoraWeights, up: LoraWeights, down: LoraWeights,
             activation: str = "swiglu", tile_rows: int | None = None) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with three LoRA linears.

    :param x: ``[..., H]`` (fp32/bf16/fp16); its dtype is the compute dtype, or autocast's when
        autocast is on (then ``x`` is cast to it and the result has that dtype).
    :param gate: ``W`` ``[F, H]``, ``A`` ``[r_g, H]``, ``B`` ``[F, r_g]``.
    :param up: ``W`` ``[F, H]``, ``A`` ``[r_u, H]``, ``B`` ``[F, r_u]``. ``gate`` and ``up`` may be
        the two row windows of one fused ``[2F, H]`` projection whose output halves are gate and
        up (``gate, up = gate_up.row_split(2)``, :meth:`LoraWeights.row_split`); that projection
        then runs as the one linear it is (one ``[N, 2F]`` base product, one branch, one
        backward; peft's rounding points).
    :param down: ``W`` ``[O, F]``, ``A`` ``[r_d, F]``, ``B`` ``[O, r_d]`` (usually ``O == H``).
    :param activation: the gate's nonlinearity: ``"swiglu"`` (SiLU; e.g. Llama, Mistral, Qwen),
        ``"geglu_tanh"`` (GELU, tanh approximation; e.g. Gemma) or ``"geglu"`` (exact erf GELU).
    :param tile_rows: sequence tiling (:mod:`corept_kernels.lora.tiled`): ``None`` automatic (on
        only when the gate/up projections of the whole call would take more than
        ``MLP_TILE_MIN_BYTES``, 2 GiB), ``0`` never, ``k`` tiles of ``k`` rows. Tiled, no
        ``[N, F]`` tensor is kept for backward, at the cost of one more MLP forward.
    :returns: ``[..., O]`` in the compute dtype.
    """
    activation_id(activation)
    check_tile_rows(tile_rows)
    _check_input(x, (gate, up), ("gate", "up"))
    if gate.shape[0] != up.shape[0] or down.shape[1] != gate.shape[0]:
        raise ValueError(f"gate {gate.shape}, up {up.shape}, down {down.shape} do not chain")
    fn, _ = capabilities.dispatch("lora_mlp", x)
    return fn(x, gate, up, down, activation, tile_rows)


def lora_qkv(x: torch.Tensor, q: LoraWeights, k: LoraWeights, v: LoraWeights
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k and v projections of ``x``, three LoRA linears on one input.

    :param x: ``[..., H]``.
    :param q: ``W`` ``[Hq, H]`` (``Hq = heads * head_dim``); ``k``, ``v``: ``W`` ``[Hkv, H]``
        (GQA: ``Hkv = kv_heads * head_dim``). Ranks may differ between the three. They may be row
        windows of one fused ``qkv_proj`` (:meth:`LoraWeights.row_split`).
    :returns: ``(q [..., Hq], k [..., Hkv], v [..., Hkv])`` in the compute dtype (``x.dtype``, or
        autocast's).
    """
    _check_input(x, (q, k, v), ("q", "k", "v"))
    fn, _ = capabilities.dispatch("lora_qkv", x)
    return fn(x, q, k, v)


def lora_o(x: torch.Tensor, o: LoraWeights) -> torch.Tensor:
    """The output projection, one LoRA linear.

    :param x: ``[..., Hq]`` (attention output, heads flattened).
    :param o: ``W`` ``[H, Hq]``, ``A`` ``[r, Hq]``, ``B`` ``[H, r]``.
    :returns: ``[..., H]`` in the compute dtype (``x.dtype``, or autocast's).
    """
    _check_input(x, (o,), ("o",))
    fn, _ = capabilities.dispatch("lora_o", x)
    return fn(x, o)


_NOTES_COMMON = ("hand-derived backward (grads for x, A, B; base W frozen); matmuls via torch "
                 "(cuBLAS) in x's dtype (autocast's under autocast), adapter branch in the adapter "
                 "dtype, rounded where peft rounds; 4-bit (nf4/fp4) base "
                 "dequantized per use via bitsandbytes; row windows of fused projections; peft fast "
                 "path only: dropout 0, no DoRA/variants, one active unmerged adapter")

capabilities.register(KernelInfo(
    name="lora_mlp", triton_fn=_lora_mlp_fused, reference_fn=_ref.lora_mlp, has_backward=True,
    compiled_fn=_lora_mlp_compiled, devices=("cuda", "cpu"),
    notes=_NOTES_COMMON + "; gated activation fwd/bwd is one Triton kernel on CUDA or under "
          "TRITON_INTERPRET, torch elementwise code elsewhere (so it runs on any device); saves x, "
          "gate/up projections and the [N, r] products, recomputes act(e)*g in backward; the two "
          "row windows of one fused gate_up linear run as that one linear (peft's rounding); "
          "long calls (gate/up above 2 GiB) run over row tiles that save x only",
))
capabilities.register(KernelInfo(
    name="lora_qkv", triton_fn=_lora_qkv_fused, reference_fn=_ref.lora_qkv, has_backward=True,
    compiled_fn=_lora_qkv_compiled, devices=("cuda", "cpu"),
    notes=_NOTES_COMMON + "; no Triton kernel (torch matmuls only, runs on any device); "
          "one node for q, k and v: x saved once, one dA matmul, dx accumulated in peft's order; "
          "saves x and [N, rq+rk+rv]",
))
capabilities.register(KernelInfo(
    name="lora_o", triton_fn=_lora_o_fused, reference_fn=_ref.lora_o, has_backward=True,
    compiled_fn=_lora_o_compiled, devices=("cuda", "cpu"),
    notes=_NOTES_COMMON + "; no Triton kernel (torch matmuls only, runs on any device); saves x and [N, r]",
))
