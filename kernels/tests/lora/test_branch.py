"""``corept_kernels.lora.branch``: fp32-accurate adapter products from bf16-operand GEMMs.

Each product is checked against float64 on odd shapes: the fp32 results to fp32 precision (a
bf16-only product would be ~1e-3 off, far outside these bounds), the bf16 results as the float64
value rounded at peft's points, but for rare one-ulp flips. The CUDA twins check what only a GPU
runs (``torch.mm(..., out_dtype=float32)``, the GEMM epilogue's single rounding in ``addmm_``).
"""
import pytest
import torch

import corept_kernels.lora.branch as lb
import corept_kernels.lora.chunks as chunks
import corept_kernels.lora.rank_add as ra
from corept_kernels.capabilities import reference_only

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the cuBLAS paths (fp32-output GEMM, addmm_ epilogue)"))]
N, IN, OUT, R = 203, 96, 72, 7
FP32_REL = 2e-5


def _rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def _bf16(*shape, dev, scale=1.0):
    return (torch.randn(*shape, device=dev) * scale).bfloat16()


def _ulp_check(ours: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, max_share=0.01, rounded_term=None):
    """``ours`` (bf16) is ``exact`` (float64, the value peft rounds) rounded to nearest, but for at
    most ``max_share`` of elements one ulp off: where the fp32-accurate operands (error ~2^-17 of
    the terms' magnitude ``scale``) straddle a rounding boundary, or cancel. ``rounded_term``: a
    term peft rounds to bf16 before the sum, whose own flip adds one of its ulps."""
    want = exact.to(torch.bfloat16)  # float64 -> bf16 rounds to nearest even
    eps = torch.finfo(torch.bfloat16).eps
    bound = eps * want.double().abs() + 2.0 ** -16 * scale
    if rounded_term is not None:
        bound = bound + eps * rounded_term.abs()
    assert ((ours.double() - want.double()).abs() <= bound).all()
    share = (ours != want).float().mean().item()
    assert share <= max_share, share


@pytest.mark.parametrize("dev", DEVICES)
def test_split_parts_sum_to_the_fp32_value(dev):
    t = torch.randn(R, IN, device=dev) * torch.logspace(-6, 3, IN, device=dev)
    parts = lb.split(t, 0)
    assert parts.dtype == torch.bfloat16 and parts.shape == (2 * R, IN)
    back = parts[:R].float() + parts[R:].float()
    assert ((back - t).abs() <= t.abs() * 2.0 ** -16).all()
    hi = t.to(torch.bfloat16)  # the plain formula, bitwise
    assert torch.equal(parts, torch.cat([hi, (t - hi.float()).to(torch.bfloat16)], 0))
    assert torch.equal(lb.split(t.t(), 1), parts.t())  # the other dim, a non-contiguous input
    assert torch.equal(lb.sum_halves(torch.arange(6.0).view(1, 6), 1), torch.tensor([[3.0, 5.0, 7.0]]))
    into = torch.zeros(1, 5)
    assert lb.sum_halves(torch.arange(6.0).view(1, 6), 1, out=into[:, 1:4]).data_ptr() == into[:, 1:].data_ptr()
    assert torch.equal(into, torch.tensor([[0.0, 3.0, 5.0, 7.0, 0.0]]))


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("shape", [(N, IN, 2 * R), (2 * R, N, IN), (1, 3, 1)])
def test_mm_f32_is_an_fp32_accumulated_product(dev, shape, monkeypatch):
    M, K, P = shape
    a, b = _bf16(M, K, dev=dev), _bf16(K, P, dev=dev)
    exact = a.double() @ b.double()
    got = lb.mm_f32(a, b)
    assert got.dtype == torch.float32
    assert _rel(got, exact) <= 1e-6
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 4 * max(M, P) * 2)  # two K-columns per chunk (CPU twin)
    assert _rel(lb.mm_f32(a, b), exact) <= 1e-6


@pytest.mark.parametrize("dev", DEVICES)
def test_small_products_are_fp32_accurate(dev):
    x, d = _bf16(N, IN, dev=dev), _bf16(N, OUT, dev=dev)
    As = [torch.randn(R, IN, device=dev) * 0.05, torch.randn(3, IN, device=dev) * 0.05]
    B = torch.randn(OUT, R, device=dev) * 0.05
    xa = lb.xa(x, As)
    assert xa.dtype == torch.float32 and xa.shape == (N, R + 3)
    assert _rel(xa, x.double() @ torch.cat(As).double().t()) <= FP32_REL
    s = 0.37
    dB, dxa = lb.dxa_dB(d, lb.split(xa[:, :R], 1), B, s, True)
    assert _rel(dxa, s * d.double() @ B.double()) <= FP32_REL
    assert _rel(dB, s * d.double().t() @ xa[:, :R].double()) <= FP32_REL
    assert lb.dxa_dB(d, None, B, s, False)[0] is None
    stacked = torch.zeros(N, R + 3, device=dev)  # dxa into its columns of a stacked [N, sum r] buffer
    lb.dxa_dB(d, None, B, s, False, out=stacked[:, 3:])
    assert torch.equal(stacked[:, 3:], dxa) and not stacked[:, :3].any()
    dA = lb.dA(dxa, x)
    assert _rel(dA, dxa.double().t() @ x.double()) <= FP32_REL


@pytest.fixture(params=["triton", "torch"])
def impl(request):
    """Both forms of the rank add: the Triton kernel (interpreter on CPU) and its torch twin (what
    ``dispatch`` answers under ``reference_only()``)."""
    if request.param == "triton":
        yield request.param
        return
    with reference_only():
        yield request.param


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("four_bit", [False, True], ids=["float-base", "4bit-base"])
def test_branch_added_with_peft_rounding(dev, four_bit, impl):
    y0 = _bf16(N, OUT, dev=dev)
    xa = torch.randn(N, R, device=dev)
    B = torch.randn(OUT, R, device=dev) * 0.3
    s = 1.5
    z = s * (xa.double() @ B.double().t())
    got = lb.add_branch_(y0.clone(), xa, B, s, four_bit)
    if four_bit:  # peft's Linear4bit: the branch rounded to bf16, then added, the sum rounded
        zr = z.to(torch.bfloat16).double()
        _ulp_check(got, y0.double() + zr, y0.double().abs() + z.abs(), max_share=0.02, rounded_term=zr)
    else:  # peft's Linear: one rounding of base + fp32 branch
        _ulp_check(got, y0.double() + z, y0.double().abs() + z.abs())


@pytest.mark.parametrize("dev", DEVICES)
def test_dx_branch_rounded_before_it_is_added(dev, monkeypatch, impl):
    dx0 = _bf16(N, IN, dev=dev)
    dxa, A = torch.randn(N, R, device=dev), torch.randn(R, IN, device=dev) * 0.2
    br = (dxa.double() @ A.double()).to(torch.bfloat16).double()
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 5 * IN * 4)  # several row chunks
    _ulp_check(lb.add_dx_branch_(dx0.clone(), dxa, A), dx0.double() + br, dx0.double().abs() + br.abs(),
               max_share=0.02, rounded_term=br)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("widths", [[5], [4, 4, 4], [3, 7], [2, 2]])
def test_split_blocks_is_each_blocks_split_side_by_side(dev, widths):
    t = torch.randn(N, sum(widths), device=dev) * torch.logspace(-4, 2, sum(widths), device=dev)
    want = torch.cat([lb.split(blk, 1) for blk in t.split(widths, 1)], 1)
    got = lb.split_blocks(t, widths)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("dev", DEVICES)
def test_stacked_row_split_is_each_weights_split(dev):
    Bs = [torch.randn(o, 4, device=dev) * 0.05 for o in (7, 3, 3)]
    parts = lb.stacked_row_split(Bs)
    assert len(parts) == 3 and all(torch.equal(p, lb.split(B, 1)) for p, B in zip(parts, Bs))
    assert lb.stacked_row_split([Bs[0]]) is None  # one weight: nothing to stack
    assert lb.stacked_row_split([Bs[0], torch.randn(3, 2, device=dev)]) is None  # ranks differ


def test_split_applies_to_fp32_adapters_on_bf16_only():
    assert lb.uses_split(torch.float32, torch.bfloat16)
    assert not lb.uses_split(torch.bfloat16, torch.bfloat16)
    assert not lb.uses_split(torch.float32, torch.float16)
    assert not lb.uses_split(torch.float32, torch.float32)


def test_rank_add_rejects_mismatched_shapes():
    y = torch.zeros(4, 6, dtype=torch.bfloat16)
    for fn in (ra.rank_add_triton_, lambda *a: ra.rank_add_group_torch_([a[:4]], a[4])):
        with pytest.raises(ValueError, match="need y"):
            fn(y, torch.zeros(4, 2), torch.zeros(3, 6), 1.0, False)
        with pytest.raises(ValueError, match="unit column stride"):
            fn(y.t(), torch.zeros(6, 2), torch.zeros(2, 4), 1.0, False)


def test_weight_split_follows_in_place_updates():
    """No stale parts: an optimizer-style in-place update or a new storage shows at the next use."""
    A = torch.randn(R, IN)
    assert torch.equal(lb.weight_split((A,), 0), lb.split(A, 0))
    with torch.no_grad():
        A.add_(1.0)
    assert torch.equal(lb.weight_split((A,), 0), lb.split(A, 0))
    A.data = torch.randn(R, IN)
    assert torch.equal(lb.weight_split((A,), 0), lb.split(A, 0))
    B = torch.randn(3, IN)
    assert torch.equal(lb.weight_split((A, B), 0), lb.split(torch.cat([A, B]), 0))
    assert lb.weight_split((A,), 1).shape == (R, 2 * IN)


@pytest.mark.parametrize("rank", [1, 100], ids=["r1", "r100-two-slices"])
def test_rank_add_any_rank(rank, impl):
    y0 = _bf16(37, 130, dev="cpu")
    u, v = torch.randn(37, rank), torch.randn(rank, 130) * 0.2
    z = u.double() @ v.double()
    _ulp_check(lb.rank_add_(y0.clone(), u, v, 1.0, False), y0.double() + z, y0.double().abs() + z.abs())


@pytest.mark.parametrize("rank", [1, 16, 100], ids=["r1", "r16", "r100-two-slices"])
@pytest.mark.parametrize("round_first", [False, True])
def test_rank_add_loads_a_transposed_factor_either_way(monkeypatch, rank, round_first):
    """``v = B.t()`` (rank dimension contiguous) read by rows of ``B`` and transposed in registers,
    or read directly: the same values, so the same bits."""
    y0 = _bf16(37, 130, dev="cpu")
    u, B = torch.randn(37, rank), torch.randn(130, rank) * 0.2
    monkeypatch.setattr(ra, "TRANSPOSED_V_MIN_N", 0)
    by_rows = ra.rank_add_triton_(y0.clone(), u, B.t(), 0.7, round_first)
    monkeypatch.setattr(ra, "TRANSPOSED_V_MIN_N", None)
    direct = ra.rank_add_triton_(y0.clone(), u, B.t(), 0.7, round_first)
    assert torch.equal(by_rows, direct)
    z = 0.7 * (u.double() @ B.double().t())
    if not round_first:
        _ulp_check(by_rows, y0.double() + z, y0.double().abs() + z.abs())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the interpreter computes every dot precision in fp32")
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("rank", [1, 16, 100], ids=["r1", "r16", "r100-two-slices"])
@pytest.mark.parametrize("transposed", [False, True])
def test_cuda_rank_add_dot_precisions_round_like_fp32(monkeypatch, precision, rank, transposed):
    """Either dot precision gives peft's rounding of the fp32-accurate sum (the same ulp bound as the
    fp32 reference), with the factor read by rows or directly, on odd shapes."""
    monkeypatch.setattr(ra, "DOT_PRECISION", precision)
    monkeypatch.setattr(ra, "TRANSPOSED_V_MIN_N", 0 if transposed else None)
    y0 = _bf16(301, 1030, dev="cuda")
    u = torch.randn(301, rank, device="cuda")
    B = torch.randn(1030, rank, device="cuda") * 0.2
    ours = ra.rank_add_triton_(y0.clone(), u, B.t(), 0.7, False)
    z = 0.7 * (u.double() @ B.double().t())
    _ulp_check(ours, y0.double() + z, y0.double().abs() + z.abs())


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("round_first", [False, True])
@pytest.mark.parametrize("n_items", [1, 2, 3, 4])
def test_rank_add_group_is_each_rank_add_alone(round_first, n_items, dev):
    """One launch for several outputs of one input: the same bits as one launch each, whatever
    the widths, ranks and scalings (four items: two launches)."""
    widths, ranks, scales = [130, 37, 64, 200][:n_items], [16, 3, 100, 8][:n_items], [0.7, 2.0, 1.0, 0.25][:n_items]
    M = 45
    ys = [_bf16(M, w, dev=dev) for w in widths]
    us = [torch.randn(M, r, device=dev) for r in ranks]
    Bs = [torch.randn(w, r, device=dev) * 0.2 for w, r in zip(widths, ranks)]
    alone = [ra.rank_add_triton_(y.clone(), u, B.t(), s, round_first) for y, u, B, s in zip(ys, us, Bs, scales)]
    grouped = [y.clone() for y in ys]
    ra.rank_add_group_triton_([(y, u, B.t(), s) for y, u, B, s in zip(grouped, us, Bs, scales)], round_first)
    for g, a in zip(grouped, alone):
        assert torch.equal(g, a)


def test_rank_add_group_falls_back_to_one_launch_each_when_it_cannot_be_built(monkeypatch, caplog):
    """A compile or resource error of the group kernel (raised before anything runs) is logged once
    and the adds run one launch each, with the same results."""
    from triton.compiler.errors import CompilationError

    class Broken:
        calls = 0

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                Broken.calls += 1
                raise CompilationError("", None, "unsupported construct")
            return launch

    monkeypatch.setattr(ra, "_rank_add_group_kernel", Broken())
    monkeypatch.setattr(ra, "GROUP_LAUNCH_FAILED", None)
    ys = [_bf16(9, w, dev="cpu") for w in (20, 33)]
    us, Bs = [torch.randn(9, 4) for _ in ys], [torch.randn(w, 4) for w in (20, 33)]
    want = [ra.rank_add_triton_(y.clone(), u, B.t(), 0.5, False) for y, u, B in zip(ys, us, Bs)]
    for _ in range(2):
        got = [y.clone() for y in ys]
        with caplog.at_level("WARNING", logger="corept_kernels.lora.rank_add"):
            ra.rank_add_group_triton_([(y, u, B.t(), 0.5) for y, u, B in zip(got, us, Bs)], False)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert Broken.calls == 1 and ra.GROUP_LAUNCH_FAILED.startswith("CompilationError")
    assert len([r for r in caplog.records if "grouped rank-add" in r.getMessage()]) == 1


def test_rank_add_group_rejects_outputs_of_different_inputs():
    a, b = _bf16(5, 8, dev="cpu"), _bf16(6, 8, dev="cpu")
    with pytest.raises(ValueError, match="row count"):
        ra.rank_add_group_triton_([(a, torch.zeros(5, 2), torch.zeros(2, 8), 1.0),
                                (b, torch.zeros(6, 2), torch.zeros(2, 8), 1.0)], False)


def test_rank_add_loads_by_rows_only_a_transposed_factor_from_the_set_width(monkeypatch):
    monkeypatch.setattr(ra, "TRANSPOSED_V_MIN_N", 100)
    B_wide, B_narrow = torch.randn(100, 16), torch.randn(99, 16)
    assert ra._by_rows(B_wide.t()) and not ra._by_rows(B_narrow.t())
    assert not ra._by_rows(torch.randn(16, 100))  # row-major v (the backward's A): direct load
    assert not ra._by_rows(torch.randn(100, 1).t())  # rank 1: no transposed layout to speak of
    monkeypatch.setattr(ra, "TRANSPOSED_V_MIN_N", None)
    assert not ra._by_rows(B_wide.t())


@pytest.mark.parametrize("n,width,itemsize", [(4096, 14336, 2), (8192, 14336, 2), (4097, 4096, 4), (5, 3, 2),
                                             (1, 10**9, 4), (0, 8, 2)])
def test_product_rows_are_the_fewest_equal_chunks_under_the_bound(n, width, itemsize):
    rows = chunks.product_rows(n, width, itemsize)
    if n == 0:
        assert rows == [slice(0, 0)]
        return
    most = max(1, chunks.CHUNK_BYTES // (width * itemsize))
    sizes = [sl.stop - sl.start for sl in rows]
    assert rows[0].start == 0 and rows[-1].stop == n and all(a.stop == b.start for a, b in zip(rows, rows[1:]))
    assert len(rows) == -(-n // most)  # no more chunks than the bound needs
    assert max(sizes) <= most and all(sz == sizes[0] for sz in sizes[:-1]) and sizes[-1] <= sizes[0]
    assert max(sizes) == -(-n // len(rows))  # balanced: the largest chunk is as small as the count allows


def test_only_a_missing_out_dtype_switches_to_the_upcast_path():
    """An older torch (unknown keyword / no kernel) falls back; running out of memory or any other
    runtime error propagates instead of silently disabling the fast path."""
    assert lb.lacks_out_dtype(TypeError("mm() got an unexpected keyword argument 'out_dtype'"))
    assert lb.lacks_out_dtype(NotImplementedError("aten::mm.dtype"))
    assert lb.lacks_out_dtype(RuntimeError("out_dtype is only supported for CUDA bf16/fp16 inputs"))
    assert not lb.lacks_out_dtype(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not lb.lacks_out_dtype(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"))
