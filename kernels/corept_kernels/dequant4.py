"""bitsandbytes 4-bit weights (nf4/fp4, with or without double quantization) dequantized in one launch.

QLoRA dequantizes every frozen 4-bit base weight right before each matmul that needs it: three
times per projection per step with gradient checkpointing (forward, recomputed forward, backward),
672 times per step on an 8B Llama. ``bitsandbytes.functional.dequantize_4bit`` spends several
operator calls on each (the nested absmax through ``dequantize_blockwise``, the ``offset`` add,
then the 4-bit kernel), and the H200 profiles showed the QLoRA step host-bound on them
(docs/perf-notes.md). Here one Triton kernel reads the packed nibbles and the (nested) absmax and
writes the weight, bit for bit what bitsandbytes writes:

* element ``i`` of the flattened weight is nibble ``i`` of the packed bytes, high nibble first;
* its value is ``code[nibble] * absmax[i // blocksize]`` in fp32, rounded once to the weight's
  dtype (round to nearest even);
* with double quantization the block scale is itself dequantized first:
  ``absmax[j] = code2[qabsmax[j]] * absmax2[j // blocksize2] + offset``, a multiply then an add,
  each rounded in fp32 like bitsandbytes' two separate ops (the launch turns FMA contraction off).

``code`` is bitsandbytes' fixed 16-entry table for the quant type (its 4-bit kernels use that
table, not ``QuantState.code``). Anything else bitsandbytes can hold (another storage layout, a
non-power-of-two block size) is left to bitsandbytes: :func:`supports` says which. So is a CPU
weight whose rows do not hold whole blocks: bitsandbytes' native CPU kernel (0.50.2) scales those
by a per-row block index, which disagrees with its own quantizer (2.5x the round-trip error on a
``[64, 96]`` weight) but is what peft computes on CPU, and corept matches peft there.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from corept_kernels.lora_act import use_triton
from corept_kernels.rounding import store_rounded

BLOCK = 1024
"""Output elements per program."""

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_CODES: dict[tuple[str, str], torch.Tensor] = {}


@triton.jit
def _dequant4_kernel(Q, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, OUT, n, log_bs, log_bs2,
                     NESTED: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    byte = tl.load(Q + (idx >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((idx & 1) == 0, byte >> 4, byte & 15)
    value = tl.load(CODE + nibble, mask=mask, other=0.0)
    blk = idx >> log_bs
    if NESTED:
        q = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(CODE2 + q, mask=mask, other=0.0) * tl.load(ABSMAX2 + (blk >> log_bs2), mask=mask, other=0.0)
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + blk, mask=mask, other=0.0)
    store_rounded(OUT + idx, value * scale, mask)


def _log2(n) -> int | None:
    n = int(n)
    return n.bit_length() - 1 if n > 0 and n & (n - 1) == 0 else None


def supports(packed: torch.Tensor, state) -> str | None:
    """``None`` when :func:`dequantize_4bit` takes this weight, else why it does not.

    :param packed: the ``Params4bit`` data (``[ceil(n / 2), 1]`` bytes, any storage dtype).
    :param state: its bitsandbytes ``QuantState``.
    """
    if not use_triton(packed):
        return "no Triton device for this tensor (CPU without the interpreter)"
    if getattr(state, "quant_type", None) not in ("nf4", "fp4"):
        return f"quant_type {getattr(state, 'quant_type', None)!r}"
    if state.dtype not in _OUT_DTYPES:
        return f"dequantized dtype {state.dtype}"
    if not packed.is_contiguous():
        return "packed weight is not contiguous"
    if _log2(state.blocksize) is None:
        return f"block size {state.blocksize} is not a power of two"
    if not packed.is_cuda and int(state.shape[-1]) % int(state.blocksize):
        # bitsandbytes' native CPU kernel (0.50.2) restarts the blocks at every row, unlike its
        # quantizer and its CUDA kernels; on CPU its result is what peft computes, so defer to it
        return "CPU weight whose rows do not hold whole blocks (bitsandbytes' CPU kernel scales those per row)"
    if getattr(state, "nested", False):
        s2 = state.state2
        if state.absmax.dtype != torch.uint8 or _log2(s2.blocksize) is None or s2.absmax.dtype != torch.float32 \
                or s2.code.dtype != torch.float32 or s2.code.numel() < 256:
            return "nested quantization state in an unexpected layout"
    elif state.absmax.dtype != torch.float32:
        return f"absmax dtype {state.absmax.dtype}"
    return None


def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """bitsandbytes' 16-entry fp32 table for ``quant_type`` on ``device`` (built once per device)."""
    key = (quant_type, str(device))
    table = _CODES.get(key)
    if table is None:
        from bitsandbytes.functional import get_4bit_type  # lazy: only 4-bit bases need bitsandbytes

        table = _CODES[key] = get_4bit_type(quant_type, device=device).to(torch.float32).contiguous()
    return table


def dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """The weight ``state.shape`` in ``state.dtype``, from its packed 4-bit data.

    :param packed: ``Params4bit`` data, ``ceil(n / 2)`` bytes (uint8, or another storage dtype
        viewed as bytes), contiguous, on CUDA or (interpreter) CPU.
    :param state: bitsandbytes ``QuantState``: ``absmax`` ``[ceil(n / blocksize)]`` fp32, or uint8
        with ``state2`` (``absmax`` fp32, ``code`` ``[256]`` fp32) and ``offset`` when nested.
    :raises ValueError: when :func:`supports` refuses the weight.
    """
    why = supports(packed, state)
    if why is not None:
        raise ValueError(f"dequantize_4bit: {why}; use bitsandbytes.functional.dequantize_4bit")
    return _launch(packed, state)


def maybe_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor | None:
    """:func:`dequantize_4bit`, or ``None`` where :func:`supports` refuses (the caller falls back)."""
    return _launch(packed, state) if supports(packed, state) is None else None


def _launch(packed: torch.Tensor, state) -> torch.Tensor:
    q = packed.reshape(-1)
    if q.dtype != torch.uint8:
        q = q.view(torch.uint8)
    shape = tuple(int(d) for d in state.shape)
    out = torch.empty(shape, dtype=state.dtype, device=packed.device)
    n = out.numel()
    if n == 0:
        return out
    if q.numel() * 2 < n:
        raise ValueError(f"dequantize_4bit: {q.numel()} packed bytes cannot hold {n} values of shape {shape}")
    code = code_table(state.quant_type, packed.device)
    nested = bool(getattr(state, "nested", False))
    if nested:
        s2 = state.state2
        absmax2, code2, offset, log_bs2 = s2.absmax, s2.code, state.offset, _log2(s2.blocksize)
        if not torch.is_tensor(offset):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
    else:  # placeholders the kernel never reads (NESTED is a compile-time branch)
        absmax2, code2, offset, log_bs2 = code, code, code, 0
    with torch.cuda.device(packed.device) if packed.is_cuda else contextlib.nullcontext():
        _dequant4_kernel[(triton.cdiv(n, BLOCK),)](
            q, state.absmax, code, absmax2, code2, offset, out, n, _log2(state.blocksize), log_bs2,
            NESTED=nested, BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    return out
