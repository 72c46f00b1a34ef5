"""GGUF block quantizers in torch (CPU or GPU): Q8_0 and the K-quants Q4_K, Q5_K and Q6_K.

Each ``quantize_*`` takes a float tensor ``x`` of shape ``(rows, cols)`` (``cols`` a multiple of
the block size: 32 for Q8_0, 256 for the K-quants) and returns ``(blocks, values)``:

* ``blocks``: ``uint8`` of shape ``(rows, cols // block * block_bytes)``, the bytes GGUF stores,
  laid out as the ``gguf`` package's dequantizers (and llama.cpp) read them;
* ``values``: ``float32`` of shape ``(rows, cols)``, what those bytes decode to (used to measure
  the quantization error without a round trip).

The K-quants search each sub-block's scale (and, for Q4_K/Q5_K, its offset) over a grid of
candidate step sizes, solving a weighted least-squares fit of ``scale * q + min ≈ x`` for each,
weights ``rms(sub-block) + |x|`` (large weights matter most), then quantize the per-sub-block
scales to 6 bits (Q4_K/Q5_K) or 8 bits (Q6_K) against one fp16 super-scale per 256 values, and
requantize the values with the scales as stored. Rows are processed in chunks, so memory stays
bounded on an 8B model's largest matrices.
"""
from __future__ import annotations

import torch

QK_K = 256
BLOCK_SIZE = {"q8_0": 32, "q4_k": QK_K, "q5_k": QK_K, "q6_k": QK_K}
BLOCK_BYTES = {"q8_0": 34, "q4_k": 144, "q5_k": 176, "q6_k": 210}
# Values per chunk. The candidate search holds about 40 bytes of temporaries per value: on CPU small
# chunks stay in cache (measured best at 2^19); on a GPU each chunk costs ~400 kernel launches, so
# chunks are large (2^24 values: ~0.7 GB of temporaries) to keep the launches from dominating.
_CHUNK = {"cpu": 1 << 19, "cuda": 1 << 24}


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as C's ``roundf`` (ggml's reference quantizers round this way)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """(n,) fp32 -> (n, 2) uint8: the fp16 value's little-endian bytes."""
    return d.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _check(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] % block:
        raise ValueError(f"quantizing needs a 2-D tensor whose rows are a multiple of {block} long; got {tuple(x.shape)}")
    return x


def _chunked(x: torch.Tensor, fn, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1, block)
    step = max(1, _CHUNK.get(x.device.type, _CHUNK["cuda"]) // block)
    outs = [fn(flat[i:i + step].float()) for i in range(0, flat.shape[0], step)]
    blocks = torch.cat([o[0] for o in outs]).reshape(x.shape[0], -1)
    values = torch.cat([o[1] for o in outs]).reshape(x.shape)
    return blocks, values


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0: blocks of 32 as one fp16 scale ``amax / 127`` and 32 int8 values (ggml's rounding)."""
    def one(b: torch.Tensor):
        d = b.abs().amax(1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = _roundf(b * inv).clamp(-127, 127)
        d16 = d.to(torch.float16)
        blocks = torch.cat([_f16_bytes(d16.float().flatten()), q.to(torch.int8).view(torch.uint8)], 1)
        return blocks, q * d16.float()
    return _chunked(_check(x, 32), one, 32)


def _fit_offset(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` (S, n): ``scale`` (S,) and ``minimum`` (S,) (≤ 0) minimizing
    ``sum w (scale * q + minimum - x)^2`` over integer ``q`` in ``[0, nmax]``, searched over
    ``steps + 1`` candidate step sizes around ``range / nmax``."""
    lo = x.amin(1).clamp(max=0)
    rng = x.amax(1) - lo
    live = rng > 0
    safe = torch.where(live, rng, torch.ones_like(rng))
    best_scale, best_min = rng / nmax, lo
    q = torch.round((x - lo[:, None]) / safe[:, None] * nmax).clamp(0, nmax)
    best_err = (w * (best_scale[:, None] * q + lo[:, None] - x) ** 2).sum(1)
    sw, swx, swxx = w.sum(1), (w * x).sum(1), (w * x * x).sum(1)
    shifted = x - lo[:, None]
    for k in range(steps + 1):
        iscale = (nmax - 1.0 + 0.1 * k) / safe
        q = torch.round(iscale[:, None] * shifted).clamp_(0, nmax)
        wq = w * q
        swq, swqq, swqx = wq.sum(1), (wq * q).sum(1), (wq * x).sum(1)
        det = sw * swqq - swq * swq
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        scale = (sw * swqx - swx * swq) / det
        minimum = (swqq * swx - swq * swqx) / det
        pos = minimum > 0  # the format stores the offset as -dmin * m with m >= 0
        scale = torch.where(pos, swqx / swqq.clamp_min(1e-30), scale)
        minimum = torch.where(pos, torch.zeros_like(minimum), minimum)
        err = swxx - scale * swqx - minimum * swx  # the residual at a least-squares optimum, from the sums alone
        better = ok & (err < best_err) & (scale > 0)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, minimum, best_min)
    return torch.where(live, best_scale, torch.zeros_like(best_scale)), best_min


def _six_bit(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 8) non-negative -> fp16-rounded super-scale (n,) and 6-bit multipliers (n, 8)."""
    top = v.amax(1)
    d = (top / 63).to(torch.float16).float()
    inv = torch.where(top > 0, 63 / top.clamp_min(1e-30), torch.zeros_like(top))
    return d, torch.round(v * inv[:, None]).clamp(0, 63)


def _pack_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """6-bit scales and mins (n, 8) -> the 12 bytes Q4_K/Q5_K store: bytes 0-3 hold sc[0:4] and the
    top two bits of sc[4:8], bytes 4-7 the same for the mins, bytes 8-11 the low nibbles of sc[4:8]
    and mn[4:8]."""
    sc, mn = sc.to(torch.int32), mn.to(torch.int32)
    b0 = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b1 = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    b2 = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return torch.cat([b0, b1, b2], 1).to(torch.uint8)


def _k_offset(b: torch.Tensor, nmax: int) -> tuple[torch.Tensor, ...]:
    """Q4_K/Q5_K common part for super-blocks ``b`` (n, 256): header bytes (n, 16), integer values
    q (n, 8, 32) in [0, nmax], and the decoded values (n, 256)."""
    n = b.shape[0]
    x = b.reshape(n * 8, 32)
    w = (x * x).mean(1, keepdim=True).sqrt() + x.abs()
    scale, minimum = _fit_offset(x, w, nmax)
    d, sc = _six_bit(scale.reshape(n, 8))
    dmin, mn = _six_bit((-minimum).reshape(n, 8))
    step = (d[:, None] * sc)[:, :, None]
    offset = (dmin[:, None] * mn)[:, :, None]
    x = b.reshape(n, 8, 32)
    q = torch.where(step > 0, torch.round((x + offset) / torch.where(step > 0, step, torch.ones_like(step))),
                    torch.zeros_like(x)).clamp(0, nmax)
    header = torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, mn)], 1)
    return header, q.to(torch.int32), (step * q - offset).reshape(n, QK_K)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 8, 32) values < 16 -> (n, 128) bytes: sub-blocks 2c (low nibble) and 2c+1 (high) share 32 bytes."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(q.shape[0], -1).to(torch.uint8)


def quantize_q4_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K: 256 values as fp16 ``d``, ``dmin``, eight 6-bit (scale, min) pairs and 4-bit values;
    value = d * scale_j * q - dmin * min_j."""
    def one(b):
        header, q, values = _k_offset(b, 15)
        return torch.cat([header, _nibbles(q)], 1), values
    return _chunked(_check(x, QK_K), one, QK_K)


def quantize_q5_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q5_K: as Q4_K with 5-bit values; the fifth bits of sub-block j are bit j of 32 shared bytes."""
    def one(b):
        header, q, values = _k_offset(b, 31)
        bits = (q >> 4) & 1
        shifts = torch.arange(8, device=q.device, dtype=torch.int32)[None, :, None]
        high = (bits << shifts).sum(1).to(torch.uint8)
        return torch.cat([header, high, _nibbles(q & 0xF)], 1), values
    return _chunked(_check(x, QK_K), one, QK_K)


def _fit_symmetric(x: torch.Tensor, nmax: int = 32, steps: int = 9) -> torch.Tensor:
    """Per row of ``x`` (S, n): the scale minimizing ``sum x^2 (scale * q - x)^2`` with integer
    ``q`` in ``[-nmax, nmax - 1]``; the largest-magnitude value maps near ``-nmax`` (the wider side)."""
    idx = x.abs().argmax(1, keepdim=True)
    peak = x.gather(1, idx).squeeze(1)
    live = peak != 0
    peak = torch.where(live, peak, torch.ones_like(peak))
    w = x * x
    best_scale = torch.zeros_like(peak)
    best_err = torch.full_like(peak, float("inf"))
    for k in range(-steps, steps + 1):
        iscale = -(nmax + 0.1 * k) / peak
        q = torch.round(iscale[:, None] * x).clamp_(-nmax, nmax - 1)
        wq = w * q
        sqq, sqx = (wq * q).sum(1), (wq * x).sum(1)
        scale = sqx / sqq.clamp_min(1e-30)
        err = -scale * sqx  # the residual at the least-squares scale, less the constant sum(w x^2)
        better = (err < best_err) & (sqq > 0)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return torch.where(live, best_scale, torch.zeros_like(best_scale))


def quantize_q6_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K: 256 values as sixteen int8 scales (one per 16 values), one fp16 ``d`` and 6-bit values;
    value = d * scale_j * (q - 32). Low nibbles fill 128 bytes, the top two bits 64 bytes."""
    def one(b):
        n = b.shape[0]
        scale = _fit_symmetric(b.reshape(n * 16, 16)).reshape(n, 16)
        idx = scale.abs().argmax(1, keepdim=True)
        peak = scale.gather(1, idx).squeeze(1)
        live = peak != 0
        iscale = torch.where(live, -128 / torch.where(live, peak, torch.ones_like(peak)), torch.zeros_like(peak))
        sc = torch.round(iscale[:, None] * scale).clamp(-128, 127)
        d = torch.where(live, 1 / torch.where(live, iscale, torch.ones_like(iscale)), torch.zeros_like(iscale))
        d = d.to(torch.float16).float()
        step = (d[:, None] * sc)[:, :, None]
        xs = b.reshape(n, 16, 16)
        q = torch.where(step != 0, torch.round(xs / torch.where(step != 0, step, torch.ones_like(step))),
                        torch.zeros_like(xs)).clamp(-32, 31)
        values = (step * q).reshape(n, QK_K)
        u = (q + 32).to(torch.int32).reshape(n, 2, 128)
        low, high = u & 0xF, u >> 4
        ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
        qh = (high[:, :, 0:32] | (high[:, :, 32:64] << 2) | (high[:, :, 64:96] << 4) | (high[:, :, 96:] << 6))
        blocks = torch.cat([ql.to(torch.uint8), qh.reshape(n, 64).to(torch.uint8),
                            sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)], 1)
        return blocks, values
    return _chunked(_check(x, QK_K), one, QK_K)


QUANTIZERS = {"q8_0": quantize_q8_0, "q4_k": quantize_q4_k, "q5_k": quantize_q5_k, "q6_k": quantize_q6_k}
