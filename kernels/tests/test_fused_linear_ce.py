"""fused_linear_cross_entropy (Triton through the interpreter, and the torch twin) vs float64 torch.

Gold: F.cross_entropy of float64 ``hidden @ weight.T + bias`` (softcap / z-loss added by hand);
every gradient (hidden, weight, bias) is checked, including the label log-prob output.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from corept_kernels import capabilities
from tolerances import assert_close_fp32, assert_low_precision_ok

flce_mod = importlib.import_module("corept_kernels.fused_linear_ce")
ref = importlib.import_module("corept_kernels.torch_ref.cross_entropy")
IMPLS = {"triton": flce_mod._fused_linear_ce_triton, "twin": ref.fused_linear_cross_entropy}
N, H, V, CHUNK = 37, 16, 300, 8  # 5 chunks, the last one ragged


def make(dtype=torch.float32, n=N, ignored=(3, 17), bias=True):
    h = torch.randn(n, H, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, dtype=torch.float64) * 0.5).to(dtype)
    b = (torch.randn(V, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, V, (n,))
    for i in ignored:
        if i < n:
            y[i] = -100
    return h, w, b, y


def gold(h, w, y, *, bias=None, softcap=None, logit_scale=1.0, label_smoothing=0.0, reduction="mean",
         z_loss=0.0, num_items_in_batch=None, return_logprobs=False, chunk_size=None):
    """Unfused float64 (or, given low-precision inputs, torch's own low-precision) reference; the
    logit scale is applied to the logits in their dtype, as HF's models do, then upcast."""
    z = h @ w.t() + (bias if bias is not None else 0)
    if logit_scale != 1.0:
        z = z * logit_scale
    z = z.double() if h.dtype == torch.float64 else z.float()  # HF: logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(z, y, label_smoothing=label_smoothing, reduction="none")
    valid = y != -100
    if z_loss:
        rows = rows + z_loss * torch.logsumexp(z, -1).square() * valid
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / (num_items_in_batch or valid.sum().clamp_min(1))
    if not return_logprobs:
        return loss
    lp = z.log_softmax(-1).gather(1, y.clamp_min(0)[:, None])[:, 0]
    return loss, torch.where(valid, lp, torch.zeros((), dtype=lp.dtype))


def run(fn, h, w, b, y, *, grads=(True, True, True), upstream=None, lp_weight=None, **kw):
    """Forward + backward. Returns (loss, logprobs | None, grad_h, grad_w, grad_b)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(g)
              for t, g in zip((h, w, b), grads)]
    out = fn(leaves[0], leaves[1], y, bias=leaves[2], **kw)
    loss, lp = out if kw.get("return_logprobs") else (out, None)
    total = loss if loss.dim() == 0 else (loss * upstream.to(loss.dtype)).sum()
    if lp is not None:
        total = total + (lp * lp_weight.to(lp.dtype)).sum()
    total.backward()
    return (loss.detach(), None if lp is None else lp.detach(),
            *[None if t is None or not t.requires_grad else t.grad for t in leaves])


def close32(out, gold_):
    assert_close_fp32(out, gold_, rtol=1e-5, atol=1e-5 * max(gold_.abs().max().item(), 1e-3))


def check_all(got, want):
    for a, b_ in zip(got, want):
        assert (a is None) == (b_ is None)
        if a is not None:
            close32(a, b_)


OPTS = [{}, {"softcap": 3.0}, {"label_smoothing": 0.1, "z_loss": 1e-3}]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: "-".join(o) or "plain")
def test_fp32_matches_fp64(impl, reduction, opts):
    h, w, b, y = make()
    up = torch.rand(N, dtype=torch.float64) + 0.5
    got = run(IMPLS[impl], h, w, b, y, upstream=up, reduction=reduction, chunk_size=CHUNK, **opts)
    want = run(gold, h.double(), w.double(), b.double(), y, upstream=up, reduction=reduction, **opts)
    check_all(got, want)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("use_loss", [True, False], ids=["loss+logprobs", "logprobs_only"])
def test_return_logprobs_gradient(impl, use_loss):
    h, w, b, y = make()
    lpw = torch.randn(N, dtype=torch.float64)
    kw = dict(return_logprobs=True, softcap=3.0, label_smoothing=0.1)

    def fn(hh, ww, yy, bias, **k):  # a DPO-like objective: uses the loss or not
        loss, lp = IMPLS[impl](hh, ww, yy, bias=bias, chunk_size=CHUNK, **k)
        return (loss if use_loss else loss.detach() * 0), lp

    got = run(fn, h, w, b, y, lp_weight=lpw, **kw)

    def gfn(hh, ww, yy, bias, **k):
        loss, lp = gold(hh, ww, yy, bias=bias, **k)
        return (loss if use_loss else loss.detach() * 0), lp

    want = run(gfn, h.double(), w.double(), b.double(), y, lp_weight=lpw, **kw)
    check_all(got, want)
    assert (got[1][[3, 17]] == 0).all()


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, False), (True, True, False)],
                         ids=["frozen_lm_head", "frozen_hidden", "no_bias_grad"])
def test_frozen_inputs(grads, monkeypatch):
    calls = []
    real = flce_mod._addmm_fp32
    monkeypatch.setattr(flce_mod, "_addmm_fp32", lambda *a, **k: calls.append(1) or real(*a, **k))
    h, w, b, y = make()
    got = run(flce_mod._fused_linear_ce_triton, h, w, b, y, grads=grads, chunk_size=CHUNK)
    want = run(gold, h.double(), w.double(), b.double(), y, grads=grads)
    check_all(got, want)
    # the weight-grad matmuls (5 chunks x row slices of the accumulator) only when W trains
    assert len(calls) == (5 * flce_mod.WEIGHT_SLICES if grads[1] else 0)


def test_no_bias_and_batched_shapes():
    h, w, _, y = make(bias=False, n=2 * 9)
    h3, y3 = h.reshape(2, 9, H), y.reshape(2, 9)
    up = torch.rand(2, 9, dtype=torch.float64) + 0.5
    got = run(flce_mod._fused_linear_ce_triton, h3, w, None, y3, upstream=up, reduction="none",
              chunk_size=4)
    assert got[0].shape == (2, 9) and got[2].shape == (2, 9, H)
    want = run(gold, h3.double().reshape(-1, H), w.double(), None, y, upstream=up.reshape(-1),
               reduction="none")
    check_all((got[0].reshape(-1), None, got[2].reshape(-1, H), got[3], None), want)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_all_ignored_and_num_items(impl):
    h, w, b, y = make(ignored=range(N))
    got = run(IMPLS[impl], h, w, b, y, chunk_size=CHUNK)
    assert got[0].item() == 0.0 and all((g == 0).all() for g in got[2:])
    h, w, b, y = make()
    got = run(IMPLS[impl], h, w, b, y, chunk_size=CHUNK, num_items_in_batch=torch.tensor(50))
    summed = run(IMPLS[impl], h, w, b, y, chunk_size=CHUNK, reduction="sum")
    check_all(got, (summed[0] / 50, None, *[g / 50 for g in summed[2:]]))
    check_all(got, run(gold, h.double(), w.double(), b.double(), y, num_items_in_batch=50))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_vs_torch_bf16(reduction):
    h, w, b, y = make(torch.bfloat16, bias=False)
    up = torch.rand(N) + 0.5
    kw = dict(reduction=reduction, softcap=3.0, upstream=up, grads=(True, True, False))
    got = run(flce_mod._fused_linear_ce_triton, h, w, None, y, chunk_size=CHUNK, **kw)
    want = run(gold, h.double(), w.double(), None, y, **kw)
    lowp = run(gold, h, w, None, y, **kw)  # HF's path: bf16 matmul, logits.float(), bf16 grads
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    for name, i in [("loss", 0), ("grad_hidden", 2), ("grad_weight", 3)]:
        assert_low_precision_ok(got[i], want[i], lowp[i], name)


def test_mixed_dtypes_under_autocast():
    """bf16 hidden with an fp32 lm_head under CPU autocast: the matmuls run in bf16 (as nn.Linear
    would), gradients come back in each input's own dtype."""
    h, w, b, y = make()
    hb = h.bfloat16()
    up = torch.ones(N)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(flce_mod._fused_linear_ce_triton, hb, w, b, y, upstream=up, chunk_size=CHUNK)
        lowp = run(IMPLS["twin"], hb, w, b, y, upstream=up)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.float32
    want = run(gold, hb.double(), w.bfloat16().double(), b.double(), y, upstream=up)
    for name, i in [("loss", 0), ("grad_hidden", 2), ("grad_weight", 3), ("grad_bias", 4)]:
        assert_low_precision_ok(got[i], want[i], lowp[i], name)


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernels)"))])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["no-softcap", "softcap"])
def test_logit_scale_fp32(impl, reduction, softcap, dev):
    """``logit_scale * (h W^T + b)``, then the softcap: loss and the grads of hidden, weight and
    bias against F.cross_entropy of explicitly scaled float64 logits (the gold's own
    ``logit_scale``), for a scale below and one above 1."""
    h, w, b, y = (t.to(dev) for t in make())
    up = torch.rand(N, dtype=torch.float64, device=dev) + 0.5
    for s in (1 / 3.0, 2.5):
        kw = dict(reduction=reduction, softcap=softcap, upstream=up, logit_scale=s)
        got = run(IMPLS[impl], h, w, b, y, chunk_size=CHUNK, **kw)
        check_all(got, run(gold, h.double(), w.double(), b.double(), y, **kw))


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["no-softcap", "softcap"])
@pytest.mark.parametrize("return_logprobs", [False, True], ids=["fast_path", "recompute_path"])
def test_logit_scale_bf16(softcap, return_logprobs):
    """bf16: the scale multiplies the fp32 upcast of the chunk logits inside the kernels, forward
    and backward; error against the float64 gold within 2x that of HF's bf16 order (bf16 logits,
    scaled in bf16, then ``float()``) + 1 ulp, for the loss, the label log-probs and every grad."""
    h, w, b, y = make(torch.bfloat16)
    up, lpw = torch.ones(N), torch.randn(N)
    kw = dict(softcap=softcap, logit_scale=1 / 0.7, upstream=up, return_logprobs=return_logprobs,
              lp_weight=lpw if return_logprobs else None)
    got = run(flce_mod._fused_linear_ce_triton, h, w, b, y, chunk_size=CHUNK, **kw)
    want = run(gold, h.double(), w.double(), b.double(), y, **kw)
    lowp = run(gold, h, w, b, y, **kw)
    assert [t.dtype for t in got[2:]] == [torch.bfloat16] * 3
    for name, i in [("loss", 0), ("logprobs", 1), ("grad_hidden", 2), ("grad_weight", 3), ("grad_bias", 4)]:
        if got[i] is not None:
            assert_low_precision_ok(got[i], want[i], lowp[i], name)


def test_logit_scale_is_applied_in_fp32_not_to_hidden(monkeypatch):
    """The chunk logits reach the CE kernels unscaled (their one bf16 rounding is the matmul's):
    the scale is a kernel argument, not a multiply of ``hidden`` or of the bf16 logits."""
    seen = []
    real = flce_mod.launch_forward

    def spy(x, *a, **k):
        seen.append((x.clone(), k["logit_scale"]))
        return real(x, *a, **k)

    monkeypatch.setattr(flce_mod, "launch_forward", spy)
    h, w, b, y = make(torch.bfloat16, bias=False)
    flce_mod._fused_linear_ce_triton(h, w, y, chunk_size=N, logit_scale=0.3)
    (logits, scale), = seen
    assert scale == 0.3 and torch.equal(logits, h @ w.t())


class _MaxBytes(TorchDispatchMode):
    """Records the largest tensor (in bytes) any aten op returns: allocations, views, and the
    interpreter's byte views of whole storages alike."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("return_logprobs", [False, True], ids=["fast_path", "recompute_path"])
def test_never_materializes_full_logits(return_logprobs):
    n, chunk = 64, 8
    h, w, b, y = make(n=n)
    kw = dict(chunk_size=chunk, return_logprobs=return_logprobs)
    up = torch.ones(n, dtype=torch.float64)
    with _MaxBytes() as fused:
        run(flce_mod._fused_linear_ce_triton, h, w, b, y, upstream=up, lp_weight=up, **kw)
    with _MaxBytes() as unfused:  # control: the tracker does see an [N, V] buffer when one exists
        run(IMPLS["twin"], h, w, b, y, upstream=up, lp_weight=up, **kw)
    fp32 = 4
    assert unfused.max_bytes >= n * V * fp32
    # largest allowed: one chunk of logits, the weight-grad accumulator, grad_hidden
    assert fused.max_bytes <= max(chunk * V, V * H, n * H) * fp32 < n * V * fp32


def test_default_chunk_size():
    # Llama-3.1-8B, 4x2048 tokens, bf16: 2048 tokens -> 525 MB chunk logits instead of 2.1 GB
    c = flce_mod.default_chunk_size(8192, 4096, 128256, torch.bfloat16)
    assert c == 2048 and c * 128256 * 2 <= flce_mod.CHUNK_BUDGET_BYTES < 8192 * 128256 * 2
    # gemma-3 vocab: 1024 tokens; a long sequence whose hidden is larger than the budget
    assert flce_mod.default_chunk_size(8192, 3840, 262144, torch.bfloat16) == 1024
    assert flce_mod.default_chunk_size(131072, 4096, 128256, torch.bfloat16) == 4096
    assert flce_mod.default_chunk_size(37, 16, 300, torch.float32) == 37  # small: one chunk


def test_no_grad_skips_gradient_work(monkeypatch):
    calls = []
    monkeypatch.setattr(flce_mod, "_Grads", lambda *a: calls.append(1))
    h, w, b, y = make()
    with torch.no_grad():
        loss = flce_mod._fused_linear_ce_triton(h.requires_grad_(), w.requires_grad_(), y, bias=b,
                                                chunk_size=CHUNK)
    assert not calls
    close32(loss, gold(h.double(), w.double(), y, bias=b.double()))


def test_nan_poisoned_buffers_are_fully_written(monkeypatch):
    monkeypatch.setenv("COREPT_KERNELS_POISON", "1")
    h, w, b, y = make(ignored=(0, 36))
    for kw in ({}, {"return_logprobs": True, "reduction": "none"}):
        got = run(flce_mod._fused_linear_ce_triton, h, w, b, y, chunk_size=CHUNK,
                  upstream=torch.ones(N), lp_weight=torch.ones(N), **kw)
        assert all(torch.isfinite(t).all() for t in got if t is not None)


def test_fast_path_backward_runs_once():
    h, w, b, y = make()
    hh = h.clone().requires_grad_()
    loss = flce_mod._fused_linear_ce_triton(hh, w, y, bias=b, chunk_size=CHUNK)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already ran"):
        loss.backward()


def test_registration_and_dispatch(monkeypatch):
    info = capabilities.get("fused_linear_cross_entropy")
    assert info.has_backward and info.compile_safe and info.devices == ("cuda",)
    assert info.reference_fn is ref.fused_linear_cross_entropy
    h, w, b, y = make()
    launches = []
    real = flce_mod.launch_forward
    monkeypatch.setattr(flce_mod, "launch_forward", lambda *a, **k: launches.append(1) or real(*a, **k))
    close32(flce_mod.fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=CHUNK),
            gold(h.double(), w.double(), y, bias=b.double()))
    assert len(launches) == 5
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    close32(flce_mod.fused_linear_cross_entropy(h, w, y, bias=b, chunk_size=CHUNK),
            gold(h.double(), w.double(), y, bias=b.double()))
    assert len(launches) == 5  # the torch twin answered
