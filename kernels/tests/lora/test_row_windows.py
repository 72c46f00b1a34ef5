"""Row windows of one LoRA linear: a fused ``gate_up_proj`` (or ``qkv_proj``) with one adapter.

peft puts one adapter on the fused linear (``A`` ``[r, H]``, ``B`` ``[2F, r]``); corept runs its
MLP on ``LoraWeights.row_split`` windows (``gate = W[:F], A, B[:F]``, ``up = W[F:], A, B[F:]``).
Here: the windows themselves (views, shared ``A``, 4-bit rows) and the sums of both halves'
gradients. Against peft and a float64 gold (fp32 tightly, bf16 within 2x peft-bf16's error + 1
ulp, NF4 bases, the tiled path) the kinds ``gate_up`` and ``qkv_fused`` run in test_api.py and
test_tiled.py.
"""
from __future__ import annotations

import pytest
import torch
from lora_helpers import H, INTER, TOKENS, peftify, quantize_nf4, tiny
from tolerances import assert_close_fp32

from corept_kernels.lora import LoraWeights, lora_mlp, read_lora_weights


def _gate_up_weights(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return LoraWeights((torch.randn(2 * INTER, H, generator=g) * 0.1).to(dtype),
                       (torch.randn(8, H, generator=g) * 0.1).requires_grad_(),
                       (torch.randn(2 * INTER, 8, generator=g) * 0.1).requires_grad_(), 2.0)


def test_row_split_windows_share_a_and_view_b_and_the_base_weight():
    lw = _gate_up_weights(torch.bfloat16)
    gate, up = lw.row_split([INTER, INTER])
    assert gate.shape == up.shape == (INTER, H) and gate.rows == slice(0, INTER) and up.rows == slice(INTER, 2 * INTER)
    assert gate.A is lw.A and up.A is lw.A
    assert gate.B.data_ptr() == lw.B.data_ptr() and up.B.data_ptr() == lw.B[INTER:].data_ptr()
    for part, start in ((gate, 0), (up, INTER)):  # dense base: a row view, no copy
        w = part.dense_weight(torch.bfloat16)
        assert w.data_ptr() == lw.weight[start:].data_ptr() and torch.equal(w, lw.weight[start:start + INTER])
    torch.testing.assert_close(up.dense_weight(torch.float32), lw.weight[INTER:].float(), rtol=0, atol=0)
    a, b = up.row_split([30, INTER - 30])  # windows of a window
    assert b.rows == slice(INTER + 30, 2 * INTER)
    assert torch.equal(b.dense_weight(torch.bfloat16), lw.weight[INTER + 30:])
    assert [p.rows for p in lw.row_split(2)] == [gate.rows, up.rows]  # n equal windows, as y.chunk(n)
    assert [p.rows.stop for p in lw.row_split(3)] == [48, 96, 144]
    with pytest.raises(ValueError, match="not a positive multiple"):
        lw.row_split(5)
    with pytest.raises(ValueError, match="sum to out_features"):
        lw.row_split([INTER, INTER - 1])
    with pytest.raises(ValueError, match="positive"):
        lw.row_split([2 * INTER, 0])
    with pytest.raises(ValueError, match="rows must be"):
        LoraWeights(lw.weight, lw.A, lw.B[:INTER], 1.0, rows=slice(INTER, 3 * INTER))


def test_the_one_a_and_b_get_the_sum_of_both_halves():
    """``dA`` is the sum of the gate and up halves' contributions and ``dB`` their concatenation:
    the same as two independent adapters ``(A, B[:F])`` and ``(A, B[F:])`` summed."""
    lw = _gate_up_weights()
    g = torch.Generator().manual_seed(1)
    down = LoraWeights(torch.randn(H, INTER, generator=g) * 0.1,
                       (torch.randn(4, INTER, generator=g) * 0.1).requires_grad_(),
                       (torch.randn(H, 4, generator=g) * 0.1).requires_grad_(), 2.0)
    x, dy = torch.randn(*TOKENS, H, generator=g), torch.randn(*TOKENS, H, generator=g)
    lora_mlp(x, *lw.row_split([INTER, INTER]), down).backward(dy)
    A1, A2 = (lw.A.detach().clone().requires_grad_() for _ in range(2))
    B1, B2 = lw.B[:INTER].detach().clone().requires_grad_(), lw.B[INTER:].detach().clone().requires_grad_()
    gate = LoraWeights(lw.weight[:INTER], A1, B1, lw.scaling)
    up = LoraWeights(lw.weight[INTER:], A2, B2, lw.scaling)
    lora_mlp(x, gate, up, down).backward(dy)
    assert_close_fp32(lw.A.grad, A1.grad + A2.grad)
    assert_close_fp32(lw.B.grad, torch.cat([B1.grad, B2.grad]))


def test_nf4_window_is_the_rows_of_the_whole_dequantized_weight():
    import bitsandbytes.functional as bnbF

    model, targets = tiny("gate_up")
    pm = peftify(quantize_nf4(model, targets, torch.bfloat16), targets)
    lw = read_lora_weights(pm.base_model.model.gate_up_proj)
    whole = bnbF.dequantize_4bit(lw.weight.data, lw.weight.quant_state)
    gate, up = lw.row_split([INTER, INTER])
    assert lw.is_4bit and gate.shape == (INTER, H)
    assert torch.equal(gate.dense_weight(torch.bfloat16), whole[:INTER])
    assert torch.equal(up.dense_weight(torch.bfloat16), whole[INTER:])
