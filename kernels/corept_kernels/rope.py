"""Rotary position embedding (rotate-half convention) for q and k in one Triton launch.

Grid: ``(token blocks, q head groups + k head groups)``, or ``(token blocks, 1)`` with q and k of
a token in one program; on CUDA a block is one token and the autotuner picks the layout and warps
per head shape (``_configs``); off CUDA (the interpreter) a block holds many tokens. A program loads
its tokens' cos/sin rows once and rotates their heads, computing in fp32. Inputs are read through their strides
(HF's ``view(...).transpose(1, 2)`` layout needs no copy); outputs are fresh tensors with the
inputs' layout, so nothing is modified in place. Partial rotary (``Dr < D``) copies dims
``Dr..D`` through. Backward applies the transposed rotation to the incoming gradients with the
same kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from corept_kernels import capabilities
from corept_kernels.capabilities import KernelInfo, unsupported_tensors
from corept_kernels.rounding import rounded, store_rounded
from corept_kernels.torch_ref import rope as ref
from corept_kernels.tuning import Launcher

HEAD_TILE = 1024
"""Rotated pairs per program (tile ``[heads, Dr/2]``); 1024 was fastest on an H200 (e.g. at
Llama-3.1-8B's shapes: 16 q heads per program). Tests lower it to exercise several head groups."""

# Tests set this to True: every buffer a kernel must fill starts as NaN, so unwritten elements show.
POISON_OUTPUTS = False


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t, memory_format=torch.preserve_format)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


@triton.jit
def _rope_heads(X, O, b, s, tmask, h0, NH, sxb, sxh, sxs, sxd, sob, soh, sos, sod, c1, c2, s1, s2, HALF, D,
                HB: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_PASS: tl.constexpr,
                BLOCK_PASS: tl.constexpr, ROUND_MID: tl.constexpr):
    # tiles [TB tokens, HB heads, BLOCK_HALF pairs]; b, s, tmask: [TB, 1, 1]; c1..s2: [TB, 1, BLOCK_HALF]
    h = h0 + tl.arange(0, HB)[None, :, None]
    hmask = tmask & (h < NH)
    d = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask = hmask & (d < HALF)
    h64 = h.to(tl.int64)
    xb = X + b * sxb + s * sxs + h64 * sxh
    ob = O + b * sob + s * sos + h64 * soh
    x1 = tl.load(xb + d * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xb + (d + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
    if ROUND_MID:  # transformers' rounding points: each product, then the sum, in the model dtype
        o1 = rounded(x1 * c1, O.dtype.element_ty) - rounded(x2 * s1, O.dtype.element_ty)
        o2 = rounded(x2 * c2, O.dtype.element_ty) + rounded(x1 * s2, O.dtype.element_ty)
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    store_rounded(ob + d * sod, o1, mask)
    store_rounded(ob + (d + HALF) * sod, o2, mask)
    if HAS_PASS:
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, None, :]
        pmask = hmask & (p < D)
        tl.store(ob + p * sod, tl.load(xb + p * sxd, mask=pmask), mask=pmask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, NTOK, S, HQ, HK, HALF, D,
                 sqb, sqh, sqs, sqd, skb, skh, sks, skd,
                 sqob, sqoh, sqos, sqod, skob, skoh, skos, skod,
                 scb, scs, scd, ssb, sss, ssd,
                 BACKWARD: tl.constexpr, TB: tl.constexpr, HBQ: tl.constexpr, HBK: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, HAS_PASS: tl.constexpr, BLOCK_PASS: tl.constexpr,
                 FUSE_QK: tl.constexpr, ROUND_MID: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64) * TB + tl.arange(0, TB)[:, None, None]  # [TB, 1, 1]
    grp = tl.program_id(1)
    tmask = tok < NTOK
    b = tok // S
    s = tok % S
    d = tl.arange(0, BLOCK_HALF)[None, None, :]
    cmask = tmask & (d < HALF)
    cb = COS + b * scb + s * scs
    sb = SIN + b * ssb + s * sss
    c1 = tl.load(cb + d * scd, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(cb + (d + HALF) * scd, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(sb + d * ssd, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(sb + (d + HALF) * ssd, mask=cmask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Forward: o1 = x1 c1 - x2 s1, o2 = x2 c2 + x1 s2. Its transpose has the same form with
        # (s1, s2) -> (-s2, -s1): rotation by -sin when the halves of cos/sin are equal, as in HF.
        s1, s2 = -s2, -s1
    if FUSE_QK:  # one program per token block: every q head, then every k head (HBQ >= HQ, HBK >= HK)
        _rope_heads(Q, QO, b, s, tmask, 0, HQ, sqb, sqh, sqs, sqd, sqob, sqoh, sqos, sqod,
                    c1, c2, s1, s2, HALF, D, HBQ, BLOCK_HALF, HAS_PASS, BLOCK_PASS, ROUND_MID)
        _rope_heads(K, KO, b, s, tmask, 0, HK, skb, skh, sks, skd, skob, skoh, skos, skod,
                    c1, c2, s1, s2, HALF, D, HBK, BLOCK_HALF, HAS_PASS, BLOCK_PASS, ROUND_MID)
    else:
        n_qgroups = tl.cdiv(HQ, HBQ)
        if grp < n_qgroups:
            _rope_heads(Q, QO, b, s, tmask, grp * HBQ, HQ, sqb, sqh, sqs, sqd, sqob, sqoh, sqos, sqod,
                        c1, c2, s1, s2, HALF, D, HBQ, BLOCK_HALF, HAS_PASS, BLOCK_PASS, ROUND_MID)
        else:
            _rope_heads(K, KO, b, s, tmask, (grp - n_qgroups) * HBK, HK, skb, skh, sks, skd, skob, skoh,
                        skos, skod, c1, c2, s1, s2, HALF, D, HBK, BLOCK_HALF, HAS_PASS, BLOCK_PASS, ROUND_MID)


def _configs(HQ: int, HK: int, block_half: int) -> tuple[list[triton.Config], triton.Config]:
    """(candidates tuned on CUDA, the default used elsewhere) for one head layout.

    Candidates: head groups of :data:`HEAD_TILE` pairs and of four times that, q and k in separate
    programs; and q and k of a token in one program (when a token's heads fit 8k pairs). On CUDA a
    program rotates one token (``TB = 1``); the default rotates a block of tokens (see
    :data:`TOKEN_TILE_OFF_CUDA`).
    """
    def groups(tile, fuse, warps, tb=1):
        per_prog = max(1, tile // block_half)
        hbq = triton.next_power_of_2(HQ) if fuse else min(triton.next_power_of_2(HQ), per_prog)
        hbk = triton.next_power_of_2(HK) if fuse else min(triton.next_power_of_2(HK), per_prog)
        if tb is None:  # as many tokens as fill TOKEN_TILE_OFF_CUDA pairs
            tb = 1 << max(0, (TOKEN_TILE_OFF_CUDA // (max(hbq, hbk) * block_half)).bit_length() - 1)
        return triton.Config({"TB": tb, "HBQ": hbq, "HBK": hbk, "FUSE_QK": fuse}, num_warps=warps)

    default_warps = 4 if min(triton.next_power_of_2(max(HQ, HK)), max(1, HEAD_TILE // block_half)) * block_half <= 1024 else 8
    default = groups(HEAD_TILE, FUSE_QK_OFF_CUDA, default_warps, tb=None)
    cands = [groups(t, False, w) for t in (HEAD_TILE, 4 * HEAD_TILE) for w in (4, 8)]
    if triton.next_power_of_2(max(HQ, HK)) * block_half <= 8192:
        cands += [groups(0, True, w) for w in (4, 8, 16)]
    unique = {(tuple(sorted(c.kwargs.items())), c.num_warps): c for c in cands}
    return list(unique.values()), default


#: Off CUDA (the interpreter), rotate q and k of a token block in one program: half the programs,
#: and the interpreter's cost is per program and operation (a decode step's RoPE: 39 ms against
#: 63 ms). Tests run both layouts; on CUDA the autotuner chooses (see :func:`_configs`).
FUSE_QK_OFF_CUDA = True

#: Off CUDA a program rotates a block of tokens of about this many pairs (a power of two, at least
#: one token): the interpreter's cost is per operation, nearly whatever the tile's size, and one
#: token per program made RoPE most of a CPU test run's time. Tests lower it to 0 (one token) and
#: to sizes that leave the last block part-masked.
TOKEN_TILE_OFF_CUDA = 16384

_LAUNCHERS: dict = {}


def _launcher(HQ: int, HK: int, block_half: int) -> Launcher:
    key = (HQ, HK, block_half, HEAD_TILE, FUSE_QK_OFF_CUDA, TOKEN_TILE_OFF_CUDA)
    if key not in _LAUNCHERS:
        configs, default = _configs(HQ, HK, block_half)
        _LAUNCHERS[key] = Launcher(_rope_kernel, configs, default, key=["HALF", "BACKWARD"])
    return _LAUNCHERS[key]


def _launch(q, k, cos, sin, backward: bool):
    """Rotate ``q [B, Hq, S, D]`` and ``k [B, Hk, S, D]`` by ``cos/sin [B, S, Dr]`` (expanded views)."""
    B, HQ, S, D = q.shape
    HK = k.shape[1]
    half = cos.shape[-1] // 2
    qo, ko = _empty_like(q), _empty_like(k)
    block_half = triton.next_power_of_2(half)
    pass_dims = D - 2 * half

    def grid(meta):
        blocks = triton.cdiv(B * S, meta["TB"])
        if meta["FUSE_QK"]:
            return (blocks, 1)
        return (blocks, triton.cdiv(HQ, meta["HBQ"]) + triton.cdiv(HK, meta["HBK"]))

    _launcher(HQ, HK, block_half)(
        grid, q.device, q, k, qo, ko, cos, sin, B * S, S, HQ, HK, half, D,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(), *cos.stride(), *sin.stride(),
        BACKWARD=backward, BLOCK_HALF=block_half, HAS_PASS=pass_dims > 0,
        BLOCK_PASS=triton.next_power_of_2(max(pass_dims, 1)),
        ROUND_MID=q.dtype != torch.float32 and cos.dtype != torch.float32)
    return qo, ko


def _expand(cs: torch.Tensor, B: int) -> torch.Tensor:
    return (cs.unsqueeze(0) if cs.dim() == 2 else cs).expand(B, -1, -1)


def _rope_forward(q, k, cos, sin):
    """``(q_out, k_out)``: ``q [B, Hq, S, D]`` and ``k [B, Hk, S, D]`` rotated by ``cos``/``sin``
    (``[S, Dr]`` or ``[1|B, S, Dr]``), fresh tensors with the inputs' layout."""
    B = q.shape[0]
    return _launch(q, k, _expand(cos, B), _expand(sin, B), backward=False)


def _rope_backward(dqo, dko, cos, sin):
    """``(dq, dk)``: the transposed rotation of ``dqo [B, Hq, S, D]`` and ``dko [B, Hk, S, D]``."""
    B = dqo.shape[0]
    return _launch(dqo, dko, _expand(cos, B), _expand(sin, B), backward=True)


def _grad_or_zeros(g: torch.Tensor | None, meta, device: torch.device) -> torch.Tensor:
    # An unused output gets no gradient (None) or zeros; its input's gradient is then zero.
    return torch.zeros(meta[0], dtype=meta[1], device=device) if g is None else g


class _RopeFn(torch.autograd.Function):
    """The eager form; inside ``torch.compile`` the operators of :mod:`corept_kernels.ops.rope`
    run the same launches."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.q_meta, ctx.k_meta = (q.shape, q.dtype), (k.shape, k.dtype)
        return _rope_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_backward(_grad_or_zeros(dqo, ctx.q_meta, cos.device),
                                _grad_or_zeros(dko, ctx.k_meta, cos.device), cos, sin)
        return dq, dk, None, None


def _check(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, S, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, _, S, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, S, D):
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in B, S or D")
    if cos.shape != sin.shape or cos.dim() not in (2, 3):
        raise ValueError(f"cos/sin must both be [S, Dr] or [B|1, S, Dr], got {tuple(cos.shape)}, {tuple(sin.shape)}")
    dr = cos.shape[-1]
    if cos.shape[-2] != S or dr % 2 or dr > D or (cos.dim() == 3 and cos.shape[0] not in (1, B)):
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not fit q {tuple(q.shape)} (need S={S}, even Dr <= {D})")


def _eligibility(q, k, cos, sin) -> str | None:
    if cos.requires_grad or sin.requires_grad:
        return "cos/sin require grad (the kernel gives them none)"
    return unsupported_tensors(q, k, cos, sin)


def _rope_triton(q, k, cos, sin):
    return _RopeFn.apply(q, k, cos, sin)


def _rope_compiled(q, k, cos, sin):
    return torch.ops.corept_kernels.rope_fwd(q, k, cos, sin)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Apply rotary embeddings: ``x * cos + rotate_half(x) * sin`` on the first ``Dr`` dims.

    :param q: ``[B, Hq, S, D]``; ``k``: ``[B, Hk, S, D]`` (any strides; ``Hq`` a multiple of ``Hk``
        or not, it does not matter).
    :param cos: ``[B, S, Dr]``, ``[1, S, Dr]`` or ``[S, Dr]`` as HF rotary modules return them
        (already scaled; per-row positions allowed); ``sin`` alike; ``Dr`` even, ``<= D``.
    :returns: ``(q_out, k_out)``: new tensors, same shape, dtype and layout as ``q`` and ``k``;
        computed in fp32. ``cos``/``sin`` get no gradient (the torch twin is used if they need one).
    """
    _check(q, k, cos, sin)
    fn, _ = capabilities.dispatch("rope", q, k, cos, sin)
    return fn(q, k, cos, sin)


capabilities.register(KernelInfo(
    name="rope", triton_fn=_rope_triton, reference_fn=ref.rope, compiled_fn=_rope_compiled,
    eligibility=_eligibility,
    notes="q and k in one launch; strided inputs; partial rotary; out of place"))
