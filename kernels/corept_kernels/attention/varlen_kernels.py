"""Triton kernels of varlen (document-masked, causal) attention: forward and FlashAttention-2's backward.

Layout: ``q [T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` read through their token and head strides
(unit stride along ``D``); ``lse`` and ``delta`` ``[Hq, T]`` fp32. Programs are ``(head, tile)``:
a tile is up to ``TILE`` consecutive tokens of one document, given by a row ``(start, doc_start,
doc_end)`` of the schedule (:func:`schedule_kernel`); rows ``(0, 0, 0)`` pad the static grid and exit.

Scores live in base 2: ``s = qk * scale * log2(e)``, or with Gemma-2's softcap
``s = softcap * log2(e) * tanh(qk * scale / softcap)``; ``lse`` is in base-2 units too.
Query ``i`` sees key ``j`` of its document iff ``i - window < j <= i`` (transformers'
``sliding_window_causal_mask_function``; no window: ``window > T``).

A tile's loop over the other side runs in three stretches (:func:`q_tile_ranges`,
:func:`kv_tile_ranges`): blocks cut by the window, blocks every pair of which is visible (no mask,
no bounds checks), blocks cut by the causal diagonal or the document's end. Blocks outside the
document, past the diagonal or outside the window are never visited.

``LOWP`` (16-bit inputs on a GPU): matmul operands stay 16-bit, probabilities and score gradients
are rounded to that dtype for their matmuls, as FlashAttention does. Otherwise (fp32, or the
interpreter, whose bf16 arithmetic is wrong) operands are fp32 and the matmuls run at ``PRECISION``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from corept_kernels.rounding import store_rounded


@triton.jit
def _load(base, idx, stride, d, mask, LOWP: tl.constexpr):
    """Rows ``idx`` (``[R]``) of a ``[*, D]`` slab at ``base`` with row stride ``stride``: ``[R, BLOCK_D]``."""
    x = tl.load(base + idx.to(tl.int64)[:, None] * stride + d[None, :], mask=mask, other=0.0)
    if not LOWP:
        x = x.to(tl.float32)
    return x


@triton.jit
def _scores(qk, qk_scale, cap, SOFTCAP: tl.constexpr):
    """(base-2 scores, tanh term) of raw ``qk``; the tanh term (``qk`` without softcap) feeds
    :func:`_dscores`. ``qk_scale`` is ``scale / softcap`` with softcap, else ``scale * log2(e)``;
    ``cap`` is ``softcap * log2(e)``."""
    if SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * (qk * qk_scale)) - 1.0  # tanh; libdevice tanh is not in the interpreter
        s = t * cap
    else:
        t = qk
        s = qk * qk_scale
    return s, t


@triton.jit
def _dscores(ds, t, SOFTCAP: tl.constexpr):
    """Gradient w.r.t. ``qk / scale`` from the gradient ``ds`` w.r.t. the (capped) scores."""
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def q_tile_ranges(q0, q1, doc0, window, BLOCK_N: tl.constexpr):
    """Key blocks of query rows ``[q0, q1)``: ``(lo, a, b, n)``; block ``j`` holds keys
    ``lo + j * BLOCK_N + [0, BLOCK_N)``; blocks ``[a, b)`` need no mask, ``[0, a)`` and ``[b, n)`` do."""
    lo = tl.maximum(doc0, q0 - window + 1)
    n = tl.cdiv(q1 - lo, BLOCK_N)
    a = tl.minimum(tl.cdiv(tl.maximum(q1 - window - lo, 0), BLOCK_N), n)  # keys > q1 - 1 - window
    b = tl.maximum(tl.minimum((q0 + 1 - lo) // BLOCK_N, n), a)  # keys <= q0
    return lo, a, b, n


@triton.jit
def kv_tile_ranges(k0, k1, doc1, window, BLOCK_M: tl.constexpr):
    """Query blocks of key columns ``[k0, k1)``: ``(hi, a, b, n)``; block ``i`` holds rows
    ``k0 + i * BLOCK_M + [0, BLOCK_M)``, rows ``>= hi`` see none of the keys; ``[a, b)`` need no mask."""
    hi = tl.minimum(doc1, k1 - 1 + window)
    n = tl.cdiv(hi - k0, BLOCK_M)
    a = tl.minimum(tl.cdiv(k1 - 1 - k0, BLOCK_M), n)  # rows >= k1 - 1
    b = tl.maximum(tl.minimum(tl.minimum(window // BLOCK_M, (doc1 - k0) // BLOCK_M), n), a)  # rows < k0 + window, < doc1
    return hi, a, b, n


@triton.jit
def _fwd_blocks(acc, m_i, l_i, q, Kh, Vh, skt, svt, lo, j0, j1, q1, rpos, window, qk_scale, cap,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                SOFTCAP: tl.constexpr, LOWP: tl.constexpr, PRECISION: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    for j in range(j0, j1):
        cols = lo + j * BLOCK_N + tl.arange(0, BLOCK_N)
        if MASKED:
            lmask = (cols < q1)[:, None] & (d < HEAD_DIM)[None, :]
        else:
            lmask = (d < HEAD_DIM)[None, :]
        k = _load(Kh, cols, skt, d, lmask, LOWP)
        v = _load(Vh, cols, svt, d, lmask, LOWP)
        s, _ = _scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), qk_scale, cap, SOFTCAP)
        if MASKED:
            vis = (cols[None, :] <= rpos[:, None]) & (cols[None, :] > rpos[:, None] - window)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if LOWP:
            p = p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["T", "window"])
def fwd_kernel(Q, K, V, O, LSE, SINK, SCHED, T, sqt, sqh, skt, skh, svt, svh, sot, soh, qk_scale, cap, window,
               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
               BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, LOWP: tl.constexpr, PRECISION: tl.constexpr,
               SINKS: tl.constexpr):
    """Grid ``(Hq, schedule rows)``: ``O`` and ``LSE`` for one query tile of one head. With ``SINKS``,
    ``SINK[h]`` (fp32, base 2) joins every row's softmax as a score that attends to nothing: ``O`` is
    normalised and ``LSE`` taken over it too, so the backward kernels need nothing more."""
    h = tl.program_id(0)
    row = SCHED + 3 * tl.program_id(1)
    q0, doc0, doc1 = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    if q0 >= doc1:
        return
    q1 = tl.minimum(q0 + TILE, doc1)
    rows = q0 + tl.arange(0, TILE)
    rmask = rows < q1
    rpos = tl.minimum(rows, q1 - 1)  # rows past the document mask like its last row: never all masked
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = _load(Q + h.to(tl.int64) * sqh, rows, sqt, d, rmask[:, None] & dmask[None, :], LOWP)
    hk = (h // GROUP).to(tl.int64)
    Kh, Vh = K + hk * skh, V + hk * svh
    # finite start: a row masked out of a whole block then gets exp2(-inf) = 0, never NaN
    m_i = tl.full([TILE], -1.0e30, tl.float32)
    l_i = tl.zeros([TILE], tl.float32)
    acc = tl.zeros([TILE, BLOCK_D], tl.float32)
    lo, a, b, n = q_tile_ranges(q0, q1, doc0, window, BLOCK_N)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, Kh, Vh, skt, svt, lo, 0, a, q1, rpos, window, qk_scale, cap,
                                HEAD_DIM, BLOCK_D, BLOCK_N, True, SOFTCAP, LOWP, PRECISION)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, Kh, Vh, skt, svt, lo, a, b, q1, rpos, window, qk_scale, cap,
                                HEAD_DIM, BLOCK_D, BLOCK_N, False, SOFTCAP, LOWP, PRECISION)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, Kh, Vh, skt, svt, lo, b, n, q1, rpos, window, qk_scale, cap,
                                HEAD_DIM, BLOCK_D, BLOCK_N, True, SOFTCAP, LOWP, PRECISION)
    if SINKS:
        sink = tl.load(SINK + h)
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.exp2(sink - m_new)
        acc = acc * alpha[:, None]
        m_i = m_new
    store_rounded(O + h.to(tl.int64) * soh + rows.to(tl.int64)[:, None] * sot + d[None, :],
                  acc / l_i[:, None], rmask[:, None] & dmask[None, :])
    tl.store(LSE + h.to(tl.int64) * T + rows, m_i + tl.log2(l_i), mask=rmask)


@triton.jit(do_not_specialize=["T"])
def delta_kernel(O, DO, DELTA, T, sot, soh, sdt, sdh,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """Grid ``(Hq, cdiv(T, ROWS))``: ``delta = rowsum(dO * O)`` in fp32."""
    h = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    rmask = rows < T
    mask = rmask[:, None] & (d < HEAD_DIM)[None, :]
    o = _load(O + h * soh, rows, sot, d, mask, False)
    do = _load(DO + h * sdh, rows, sdt, d, mask, False)
    tl.store(DELTA + h * T + rows, tl.sum(o * do, 1), mask=rmask)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, Kh, Vh, skt, svt, lo, j0, j1, q1, rpos, window, qk_scale, cap,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               SOFTCAP: tl.constexpr, LOWP: tl.constexpr, PRECISION: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    for j in range(j0, j1):
        cols = lo + j * BLOCK_N + tl.arange(0, BLOCK_N)
        if MASKED:
            lmask = (cols < q1)[:, None] & (d < HEAD_DIM)[None, :]
        else:
            lmask = (d < HEAD_DIM)[None, :]
        k = _load(Kh, cols, skt, d, lmask, LOWP)
        v = _load(Vh, cols, svt, d, lmask, LOWP)
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), qk_scale, cap, SOFTCAP)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            vis = (cols[None, :] <= rpos[:, None]) & (cols[None, :] > rpos[:, None] - window)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = _dscores(p * (dp - delta[:, None]), t, SOFTCAP)
        if LOWP:
            ds = ds.to(k.dtype)
        dq += tl.dot(ds, k, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["T", "window"])
def dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, SCHED, T, sqt, sqh, skt, skh, svt, svh, sdt, sdh, sdqt, sdqh,
              scale, qk_scale, cap, window,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
              BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, LOWP: tl.constexpr, PRECISION: tl.constexpr):
    """Grid ``(Hq, schedule rows)``: ``dQ`` of one query tile of one head (keys as in the forward)."""
    h = tl.program_id(0)
    row = SCHED + 3 * tl.program_id(1)
    q0, doc0, doc1 = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    if q0 >= doc1:
        return
    q1 = tl.minimum(q0 + TILE, doc1)
    rows = q0 + tl.arange(0, TILE)
    rmask = rows < q1
    rpos = tl.minimum(rows, q1 - 1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    h64 = h.to(tl.int64)
    q = _load(Q + h64 * sqh, rows, sqt, d, rmask[:, None] & dmask[None, :], LOWP)
    do = _load(DO + h64 * sdh, rows, sdt, d, rmask[:, None] & dmask[None, :], LOWP)
    lse = tl.load(LSE + h64 * T + rows, mask=rmask, other=0.0)
    delta = tl.load(DELTA + h64 * T + rows, mask=rmask, other=0.0)
    hk = (h // GROUP).to(tl.int64)
    Kh, Vh = K + hk * skh, V + hk * svh
    dq = tl.zeros([TILE, BLOCK_D], tl.float32)
    lo, a, b, n = q_tile_ranges(q0, q1, doc0, window, BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse, delta, Kh, Vh, skt, svt, lo, 0, a, q1, rpos, window, qk_scale, cap,
                    HEAD_DIM, BLOCK_D, BLOCK_N, True, SOFTCAP, LOWP, PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, Kh, Vh, skt, svt, lo, a, b, q1, rpos, window, qk_scale, cap,
                    HEAD_DIM, BLOCK_D, BLOCK_N, False, SOFTCAP, LOWP, PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, Kh, Vh, skt, svt, lo, b, n, q1, rpos, window, qk_scale, cap,
                    HEAD_DIM, BLOCK_D, BLOCK_N, True, SOFTCAP, LOWP, PRECISION)
    store_rounded(DQ + h64 * sdqh + rows.to(tl.int64)[:, None] * sdqt + d[None, :],
                  dq * scale, rmask[:, None] & dmask[None, :])


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqt, sdt, k0, i0, i1, cols, hi, window, qk_scale, cap,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                 SOFTCAP: tl.constexpr, LOWP: tl.constexpr, PRECISION: tl.constexpr):
    # transposed tiles [keys, rows]: dV and dK accumulate without transposing P or dS
    d = tl.arange(0, BLOCK_D)
    for i in range(i0, i1):
        rows = k0 + i * BLOCK_M + tl.arange(0, BLOCK_M)
        if MASKED:
            rmask = rows < hi
            lmask = rmask[:, None] & (d < HEAD_DIM)[None, :]
            lse = tl.load(LSEh + rows, mask=rmask, other=0.0)
            delta = tl.load(DELTAh + rows, mask=rmask, other=0.0)
        else:
            lmask = (d < HEAD_DIM)[None, :]
            lse = tl.load(LSEh + rows)
            delta = tl.load(DELTAh + rows)
        q = _load(Qh, rows, sqt, d, lmask, LOWP)
        do = _load(DOh, rows, sdt, d, lmask, LOWP)
        s_t, t_t = _scores(tl.dot(k, tl.trans(q), input_precision=PRECISION), qk_scale, cap, SOFTCAP)
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            vis = (cols[:, None] <= rows[None, :]) & (cols[:, None] > rows[None, :] - window) & rmask[None, :]
            p_t = tl.where(vis, p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = _dscores(p_t * (dp_t - delta[None, :]), t_t, SOFTCAP)
        if LOWP:
            p_t = p_t.to(do.dtype)
            ds_t = ds_t.to(q.dtype)
        dv += tl.dot(p_t, do, input_precision=PRECISION)
        dk += tl.dot(ds_t, q, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["T", "window"])
def dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, SCHED, T, sqt, sqh, skt, skh, svt, svh, sdt, sdh,
                sdkt, sdkh, sdvt, sdvh, scale, qk_scale, cap, window,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
                BLOCK_M: tl.constexpr, SOFTCAP: tl.constexpr, LOWP: tl.constexpr, PRECISION: tl.constexpr):
    """Grid ``(Hkv, schedule rows)``: ``dK`` and ``dV`` of one key tile of one kv head, summed over
    the ``GROUP`` query heads that share it in one program (deterministic, no atomics)."""
    hk = tl.program_id(0)
    row = SCHED + 3 * tl.program_id(1)
    k0, doc1 = tl.load(row), tl.load(row + 2)
    if k0 >= doc1:
        return
    k1 = tl.minimum(k0 + TILE, doc1)
    cols = k0 + tl.arange(0, TILE)
    d = tl.arange(0, BLOCK_D)
    cmask = (cols < k1)[:, None] & (d < HEAD_DIM)[None, :]
    hk64 = hk.to(tl.int64)
    k = _load(K + hk64 * skh, cols, skt, d, cmask, LOWP)
    v = _load(V + hk64 * svh, cols, svt, d, cmask, LOWP)
    dk = tl.zeros([TILE, BLOCK_D], tl.float32)
    dv = tl.zeros([TILE, BLOCK_D], tl.float32)
    hi, a, b, n = kv_tile_ranges(k0, k1, doc1, window, BLOCK_M)
    for g in range(GROUP):
        h = hk64 * GROUP + g
        Qh, DOh, LSEh, DELTAh = Q + h * sqh, DO + h * sdh, LSE + h * T, DELTA + h * T
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqt, sdt, k0, 0, a, cols, hi, window,
                              qk_scale, cap, HEAD_DIM, BLOCK_D, BLOCK_M, True, SOFTCAP, LOWP, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqt, sdt, k0, a, b, cols, hi, window,
                              qk_scale, cap, HEAD_DIM, BLOCK_D, BLOCK_M, False, SOFTCAP, LOWP, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqt, sdt, k0, b, n, cols, hi, window,
                              qk_scale, cap, HEAD_DIM, BLOCK_D, BLOCK_M, True, SOFTCAP, LOWP, PRECISION)
    cols64 = cols.to(tl.int64)[:, None]
    store_rounded(DK + hk64 * sdkh + cols64 * sdkt + d[None, :], dk * scale, cmask)
    store_rounded(DV + hk64 * sdvh + cols64 * sdvt + d[None, :], dv, cmask)


@triton.jit(do_not_specialize=["N", "size"])
def schedule_kernel(CU, SCHED, N, size, TILE: tl.constexpr, DOCS: tl.constexpr):
    """Grid ``(cdiv(T, TILE), 2)``: program ``(r, order)`` writes the schedule rows of rank ``r``.

    Order 0 (query tiles: forward, dQ) lists tiles by their index in their document, descending
    (the ``r``-th tile of a document attends to ``r + 1`` key tiles at most); order 1 (key tiles:
    dK/dV) by the number of tiles after them, descending. Heaviest tiles start first, so the last
    programs are short. Ranks of equal value list documents in order. Rank 0 also fills the
    padding rows ``(0, 0, 0)`` up to ``size``.
    """
    r = tl.program_id(0)
    order = tl.program_id(1)
    out = SCHED + order.to(tl.int64) * size * 3
    first = tl.zeros([], tl.int32)  # rows of higher rank: sum over documents of max(0, tiles - r - 1)
    for c in range(0, N, DOCS):
        doc = c + tl.arange(0, DOCS)
        start = tl.load(CU + doc, mask=doc < N, other=0)
        tiles = tl.cdiv(tl.load(CU + doc + 1, mask=doc < N, other=0) - start, TILE)
        first += tl.sum(tl.maximum(tiles - r - 1, 0))
    pos = first
    for c in range(0, N, DOCS):
        doc = c + tl.arange(0, DOCS)
        start = tl.load(CU + doc, mask=doc < N, other=0)
        end = tl.load(CU + doc + 1, mask=doc < N, other=0)
        tiles = tl.cdiv(end - start, TILE)
        take = tiles > r
        at = (pos + tl.cumsum(take.to(tl.int32), 0) - 1) * 3
        local = tl.where(order == 0, r, tiles - 1 - r)
        tl.store(out + at, start + local * TILE, mask=take)
        tl.store(out + at + 1, start, mask=take)
        tl.store(out + at + 2, end, mask=take)
        pos += tl.sum(take.to(tl.int32))
    if r == 0:  # pos is now the number of tiles
        for p in range(pos, size, DOCS):
            at = p + tl.arange(0, DOCS)
            for f in tl.static_range(3):
                tl.store(out + at * 3 + f, tl.zeros([DOCS], tl.int32), mask=at < size)
