"""The one-launch 4-bit dequantization against bitsandbytes, bit for bit, on odd shapes.

CPU runs the kernel through the Triton interpreter; the CUDA twins (skipped without a GPU) compare
with bitsandbytes' CUDA kernels, where FMA contraction of the nested scale would show.

The kernel (``_launch``) is checked on every shape against :func:`_reference`: bitsandbytes' flat
block layout (the one its quantizer and its CUDA kernels use) written out in torch, with the
nested scale from bitsandbytes' public ``dequantize_blockwise``. It is also checked against
bitsandbytes' public ``dequantize_4bit`` on CUDA, and on CPU where rows hold whole blocks: there
only, because bitsandbytes' native CPU kernel (0.50.2) restarts the blocks at every row, so for
rows of e.g. 96 values with 64-value blocks it scales by another block's absmax (measured: 2.5x
the round-trip error of the flat layout on a ``[64, 96]`` weight). The public entry points refuse
those CPU weights (:func:`corept_kernels.dequant4.supports`) so corept matches peft on CPU.
"""
import dataclasses

import pytest
import torch

bnbF = pytest.importorskip("bitsandbytes.functional")

from corept_kernels import dequant4  # noqa: E402
from corept_kernels.lora_weights import LoraWeights  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU (bitsandbytes' CUDA kernels)"))]
SHAPES = [(37, 29), (5, 130), (1, 7), (64, 96)]  # odd element counts, a partial last block, one row


def _quantized(shape, dtype, quant_type, nested, blocksize, device, storage=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3).to(dtype).to(device)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested,
                                       quant_storage=storage)
    return packed, state


def _reference(packed, state) -> torch.Tensor:
    """bitsandbytes' 4-bit layout in torch: nibble ``i`` (high first) times block ``i // blocksize``'s scale."""
    q = packed.reshape(-1).view(torch.uint8).long()
    nibbles = torch.stack([q >> 4, q & 15], dim=1).reshape(-1)
    n = int(torch.Size(state.shape).numel())
    values = dequant4.code_table(state.quant_type, packed.device)[nibbles[:n]]
    absmax = state.absmax
    if state.nested:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    scale = absmax.float()[torch.arange(n, device=packed.device) // state.blocksize]
    return (values * scale).to(state.dtype).reshape(state.shape)


def _check(packed, state):
    ours = dequant4._launch(packed, state)
    assert ours.dtype == state.dtype and ours.shape == state.shape
    assert torch.equal(ours, _reference(packed, state))
    whole_blocks = state.shape[-1] % state.blocksize == 0
    assert (dequant4.supports(packed, state) is None) == (packed.is_cuda or whole_blocks)
    if packed.is_cuda or whole_blocks:
        assert torch.equal(dequant4.dequantize_4bit(packed, state), bnbF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_bitsandbytes_bitwise(device, shape, quant_type, nested, dtype):
    packed, state = _quantized(shape, dtype, quant_type, nested, 64, device)
    _check(packed, state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_block_sizes(device, blocksize):
    for nested in (False, True):
        packed, state = _quantized((33, 300), torch.bfloat16, "nf4", nested, blocksize, device, seed=blocksize)
        _check(packed, state)


@pytest.mark.parametrize("device", DEVICES)
def test_nested_second_level_blocks(device):
    """More first-level blocks than one nested block (256): the second-level index must advance."""
    packed, state = _quantized((300, 128), torch.bfloat16, "nf4", True, 64, device, seed=3)
    assert state.nested and state.absmax.numel() > 2 * state.state2.blocksize
    _check(packed, state)


@pytest.mark.parametrize("device", DEVICES)
def test_other_storage_dtype(device):
    """FSDP-style ``quant_storage=bfloat16``: the same bytes, viewed as uint8."""
    packed, state = _quantized((16, 64), torch.bfloat16, "nf4", True, 64, device, storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    _check(packed, state)


def test_nibble_order_and_scale_by_hand():
    """Independent of bitsandbytes' dequantizer: high nibble first, value = code * block absmax."""
    code = dequant4.code_table("nf4", torch.device("cpu"))
    packed = torch.tensor([[0x0F], [0x83], [0x70]], dtype=torch.uint8)  # 5 values: 0,15,8,3,7
    state = bnbF.QuantState(absmax=torch.tensor([2.0, 0.5]), shape=torch.Size([5]), code=code, blocksize=32,
                            quant_type="nf4", dtype=torch.float32)
    state.blocksize = 4  # a power of two the kernel takes; bitsandbytes never builds one this small
    out = dequant4._launch(packed, state)
    want = torch.stack([code[0] * 2, code[15] * 2, code[8] * 2, code[3] * 2, code[7] * 0.5])
    assert torch.equal(out, want)


def test_cpu_rows_without_whole_blocks_go_to_bitsandbytes():
    packed, state = _quantized((8, 96), torch.bfloat16, "nf4", True, 64, "cpu")
    assert "whole blocks" in dequant4.supports(packed, state)
    assert dequant4.maybe_dequantize_4bit(packed, state) is None
    weight = torch.nn.Parameter(packed, requires_grad=False)
    weight.quant_state = state
    lw = LoraWeights(weight, torch.zeros(2, 96), torch.zeros(8, 2), 1.0)
    assert torch.equal(lw.dense_weight(torch.bfloat16), bnbF.dequantize_4bit(packed, state))


def test_refusals_name_the_reason():
    packed, state = _quantized((8, 64), torch.bfloat16, "nf4", False, 64, "cpu")
    odd = dataclasses.replace(state) if dataclasses.is_dataclass(state) else _copy_state(state)
    odd.blocksize = 96
    assert "power of two" in dequant4.supports(packed, odd)
    with pytest.raises(ValueError, match="power of two"):
        dequant4.dequantize_4bit(packed, odd)
    assert dequant4.maybe_dequantize_4bit(packed, odd) is None
    assert torch.equal(dequant4.maybe_dequantize_4bit(packed, state), _reference(packed, state))
    strided = torch.empty(packed.numel() * 2, 1, dtype=torch.uint8)[::2]
    strided.copy_(packed)
    assert "contiguous" in dequant4.supports(strided, state)


def test_dense_weight_uses_the_kernel_and_matches(monkeypatch):
    """``LoraWeights.dense_weight`` goes through the kernel where it can, with bitsandbytes' bits."""
    packed, state = _quantized((48, 128), torch.bfloat16, "nf4", True, 64, "cpu")
    weight = torch.nn.Parameter(packed, requires_grad=False)
    weight.quant_state = state
    lw = LoraWeights(weight, torch.zeros(2, 128), torch.zeros(48, 2), 1.0)
    calls = []
    real = dequant4._launch
    monkeypatch.setattr(dequant4, "_launch", lambda p, s: calls.append(1) or real(p, s))
    got = lw.dense_weight(torch.float32)
    assert calls == [1]
    assert torch.equal(got, _reference(packed, state).float())


def test_dense_weight_falls_back_to_bitsandbytes(monkeypatch):
    """A weight the kernel refuses is still dequantized, by bitsandbytes."""
    packed, state = _quantized((48, 40), torch.bfloat16, "fp4", False, 64, "cpu")
    weight = torch.nn.Parameter(packed, requires_grad=False)
    weight.quant_state = state
    monkeypatch.setattr(dequant4, "supports", lambda p, s: "refused for the test")
    monkeypatch.setattr(dequant4, "_launch", lambda p, s: pytest.fail("kernel used after refusal"))
    lw = LoraWeights(weight, torch.zeros(2, 40), torch.zeros(48, 2), 1.0)
    assert torch.equal(lw.dense_weight(torch.bfloat16), bnbF.dequantize_4bit(packed, state))


def _copy_state(state):
    import copy

    return copy.copy(state)
