"""The fused LoRA MLP over row tiles: for long sequences, no ``[N, F]`` tensor is saved.

:class:`~corept_kernels.lora.mlp.LoraMLP` saves the gate and up projections ``e``, ``g``
(``[N, F]`` each) for its backward. At long sequences they dominate a decoder layer's memory:
Llama-3.1-8B at 102,400 tokens, 5.5 GiB of the ~16 GiB one layer's recompute and backward take, and
the no-grad first pass of checkpointing holds ``e``, ``g`` and ``h`` (8.2 GiB) at once.
:class:`TiledLoraMLP` runs ``LoraMLP`` on row tiles instead:

* forward: each tile through ``LoraMLP`` with no graph, its output copied into ``y`` ``[N, O]``;
  only ``x`` is saved;
* backward: per tile, ``LoraMLP`` again with a graph, then its backward with that tile's ``dy``;
  ``dx`` is written tile by tile, the adapter gradients accumulate in fp32 (for fp32 adapters:
  peft's default) over the tiles.

Rows of an MLP are independent, so every output row and ``dx`` row is the untiled one's (up to
the GEMM library choosing another algorithm for another row count); ``dA``/``dB`` are sums over
rows, formed tile by tile. The cost is one more MLP forward per step (the tile's recompute), so
tiling is for sequences where memory, not time, is the limit: :func:`mlp_tile_rows` turns it on
only when the whole call's ``e`` and ``g`` would exceed :data:`MLP_TILE_MIN_BYTES`.
"""
from __future__ import annotations

import torch

from corept_kernels.lora.autograd import autocast_off_backward
from corept_kernels.lora.mlp import LoraMLP, MlpLinears

MLP_TILE_MIN_BYTES = 2 << 30
"""Tile the MLP (automatic choice) once its whole-call gate and up projections would take more
than this (Llama-3.1-8B in bf16: above ~37k tokens per call). Below it, the untiled MLP is faster
and its saved ``[N, F]`` pair fits next to the rest of a layer."""

MLP_TILE_BYTES = 512 << 20
"""Bytes of one tile's gate and up projections (Llama-3.1-8B in bf16: 9,362 rows)."""


def check_tile_rows(tile_rows: int | None) -> None:
    """``ValueError`` unless ``tile_rows`` is ``None``, 0 or a positive row count."""
    if tile_rows is not None and tile_rows < 0:
        raise ValueError(f"tile_rows must be None (automatic), 0 (never) or a positive row count, got {tile_rows}")


def mlp_tile_rows(n: int, width: int, itemsize: int, tile_rows: int | None = None) -> int | None:
    """Rows per tile for an MLP call of ``n`` rows and intermediate ``width``, or ``None`` (untiled).

    :param tile_rows: the caller's choice: ``None`` automatic (tiles of :data:`MLP_TILE_BYTES` when
        ``e`` and ``g`` would take more than :data:`MLP_TILE_MIN_BYTES`), ``0`` never, ``k > 0``
        tiles of ``k`` rows (untiled when ``n <= k``).
    """
    if tile_rows is not None:
        check_tile_rows(tile_rows)
        return tile_rows if 0 < tile_rows < n else None
    pair = 2 * width * itemsize  # bytes of e and g per row
    if n * pair <= MLP_TILE_MIN_BYTES:
        return None
    return max(1, MLP_TILE_BYTES // pair)


def _tiles(n: int, rows: int) -> list[slice]:
    return [slice(i, min(n, i + rows)) for i in range(0, n, rows)]


class TiledLoraMLP(torch.autograd.Function):
    """``LoraMLP`` over row tiles of ``rows`` rows; saves ``x`` only.

    ``apply(x, activation, lin, rows, *flat)``: ``x`` ``[..., H]``, ``lin`` the MLP's linears
    (:class:`~corept_kernels.lora.mlp.MlpLinears`: gate and up, or one gate_up, then down),
    ``flat`` their ``(A, B, bias)`` triples. Returns ``[..., O]``.
    """

    @staticmethod
    def forward(ctx, x, activation, lin: MlpLinears, rows, *flat):
        x2 = x.reshape(-1, x.shape[-1])
        n, out_f = x2.shape[0], lin.down.shape[0]
        y = torch.empty(n, out_f, dtype=x.dtype, device=x.device)
        for sl in _tiles(n, rows):  # grad mode is off inside forward: no graph, nothing saved
            y[sl] = LoraMLP.apply(x2[sl], activation, lin, *flat)
        ctx.save_for_backward(x2, *flat)
        ctx.activation, ctx.lin, ctx.rows, ctx.lead = activation, lin, rows, x.shape[:-1]
        ctx.device_type = x.device.type
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    @autocast_off_backward
    def backward(ctx, dy):
        x2, *flat = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x, need_flat = need[0], need[4:]
        leaves = [None if t is None else t.detach().requires_grad_(bool(nf)) for t, nf in zip(flat, need_flat)]
        inputs = [t for t in leaves if t is not None and t.requires_grad]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(x2) if need_x else None
        for sl in _tiles(x2.shape[0], ctx.rows):
            xs = x2[sl].detach().requires_grad_(need_x)
            with torch.enable_grad():  # ys needs grad: autograd calls this only when x or a leaf does
                ys = LoraMLP.apply(xs, ctx.activation, ctx.lin, *leaves)
            torch.autograd.backward(ys, dy2[sl], inputs=([xs] if need_x else []) + inputs)
            if need_x:
                dx[sl] = xs.grad
            del ys, xs  # the tile's saved e/g go before the next tile is recomputed
        grads = [None if t is None or not t.requires_grad else t.grad for t in leaves]
        return (None if dx is None else dx.view(*ctx.lead, x2.shape[1]), None, None, None, *grads)
