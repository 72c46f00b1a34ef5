"""cross_entropy (Triton kernels through the interpreter, and the torch twin) vs float64 torch.

Gold: ``torch.nn.functional.cross_entropy`` on float64 logits (softcap and z-loss added by hand),
reduced with corept's rules (mean over non-ignored tokens, 0.0 when all are ignored).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from corept_kernels import capabilities
from tolerances import assert_close_fp32, assert_low_precision_ok

# modules by path: the package re-exports a function named like the module
ce_mod = importlib.import_module("corept_kernels.cross_entropy")
ref = importlib.import_module("corept_kernels.torch_ref.cross_entropy")
cross_entropy, _cross_entropy_triton = ce_mod.cross_entropy, ce_mod._cross_entropy_triton
IMPLS = {"triton": _cross_entropy_triton, "twin": ref.cross_entropy}


def gold_ce(x, y, *, ignore_index=-100, logit_scale=1.0, softcap=None, label_smoothing=0.0,
            reduction="mean", num_items_in_batch=None, z_loss=0.0):
    """float64 reference built on F.cross_entropy. x: [N, V] (any dtype), y: [N]."""
    z = x.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(z, y, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")
    valid = y != ignore_index
    if z_loss:
        rows = rows + z_loss * torch.logsumexp(z, -1).square() * valid
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if num_items_in_batch is not None:
        return rows.sum() / num_items_in_batch
    return rows.sum() / valid.sum().clamp_min(1)


def close32(out, gold):
    assert_close_fp32(out, gold, rtol=1e-5, atol=1e-5 * max(gold.abs().max().item(), 1e-3))


def run_and_grad(fn, x, y, upstream=None, **kw):
    """Forward + backward of fn; "none" losses are weighted by ``upstream`` [N] before summing."""
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, y, **kw)
    (loss if loss.dim() == 0 else (loss * upstream).sum()).backward()
    return loss.detach(), x.grad


def make(N, V, dtype=torch.float32, ignored=(3, 17), scale=3.0):
    x = (torch.randn(N, V, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, V, (N,))
    for i in ignored:
        if i < N:
            y[i] = -100
    return x, y


OPTION_SETS = [
    {},
    {"softcap": 4.0},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 4.0, "label_smoothing": 0.2, "z_loss": 1e-3},
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
def test_fp32_matches_fp64(impl, reduction, opts, monkeypatch):
    if opts in (OPTION_SETS[0], OPTION_SETS[-1]):
        # 256-wide vocabulary blocks: V=1000 runs the chunked loop (4 blocks, ragged end); the
        # other option sets keep one 1024 block (the interpreter pays per block)
        monkeypatch.setitem(ce_mod.MAX_BLOCK, "cpu", 256)
    x, y = make(37, 1000)
    up = torch.rand(37, dtype=torch.float64) + 0.5
    loss, grad = run_and_grad(IMPLS[impl], x, y, up.float(), reduction=reduction, **opts)
    gl, gg = run_and_grad(gold_ce, x.double(), y, up, reduction=reduction, **opts)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    close32(loss, gl)
    close32(grad, gg)
    assert (grad[3] == 0).all() and (grad[17] == 0).all()
    if reduction == "none":
        assert loss[3] == 0 and loss[17] == 0


def test_gold_mean_is_torch_mean():
    """Our mean rule equals torch's own mean (with smoothing) whenever some token counts."""
    x, y = make(37, 1000)
    ours = gold_ce(x, y, label_smoothing=0.1)
    torch.testing.assert_close(ours, F.cross_entropy(x.double(), y, label_smoothing=0.1))


@pytest.mark.parametrize("opts", [{}, {"softcap": 4.0, "label_smoothing": 0.1, "z_loss": 1e-3}],
                         ids=["plain", "all"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_vs_torch_bf16(opts, reduction):
    x, y = make(37, 1000, torch.bfloat16)
    up = torch.rand(37) + 0.5
    loss, grad = run_and_grad(_cross_entropy_triton, x, y, up, reduction=reduction, **opts)
    assert grad.dtype == torch.bfloat16
    gl, gg = run_and_grad(gold_ce, x.double(), y, up.double(), reduction=reduction, **opts)

    def torch_bf16(xb, yb, reduction):  # the same op computed by torch in bf16
        z = xb if opts.get("softcap") is None else opts["softcap"] * torch.tanh(xb / opts["softcap"])
        rows = F.cross_entropy(z, yb, label_smoothing=opts.get("label_smoothing", 0.0),
                               reduction="none")
        if opts.get("z_loss"):
            rows = rows + opts["z_loss"] * torch.logsumexp(z, -1).square() * (yb != -100)
        return rows if reduction == "none" else rows.sum() / (yb != -100).sum()

    tl_, tg = run_and_grad(torch_bf16, x, y, up.bfloat16(), reduction=reduction)
    assert_low_precision_ok(loss, gl, tl_, "loss")
    assert_low_precision_ok(grad, gg, tg, "dlogits")


def test_large_vocab_chunked_loop():
    """V=50257 (GPT-2) with the default 4096 block: 13 vocabulary blocks, softcap + smoothing."""
    x, y = make(3, 50257, ignored=(1,))
    opts = dict(softcap=20.0, label_smoothing=0.05, z_loss=1e-4)
    loss, grad = run_and_grad(_cross_entropy_triton, x, y, **opts)
    gl, gg = run_and_grad(gold_ce, x.double(), y, **opts)
    assert ce_mod._config(50257, x.device)[0] < 50257
    close32(loss, gl)
    close32(grad, gg)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_all_tokens_ignored(impl):
    x, y = make(5, 300, ignored=range(5))
    loss, grad = run_and_grad(IMPLS[impl], x, y)
    assert loss.item() == 0.0 and not torch.isnan(loss)  # torch would give NaN here
    assert (grad == 0).all()
    rows, _ = run_and_grad(IMPLS[impl], x, y, torch.ones(5), reduction="none")
    assert (rows == 0).all()
    assert IMPLS[impl](x, y, reduction="sum").item() == 0.0


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_is_sum_over_items(impl, as_tensor):
    x, y = make(37, 1000)
    k = torch.tensor(123) if as_tensor else 123
    loss, grad = run_and_grad(IMPLS[impl], x, y, num_items_in_batch=k)
    s_loss, s_grad = run_and_grad(IMPLS[impl], x, y, reduction="sum")
    close32(loss, s_loss.double() / 123)
    close32(grad, s_grad.double() / 123)
    gl, gg = run_and_grad(gold_ce, x.double(), y, num_items_in_batch=123)
    close32(loss, gl)
    close32(grad, gg)
    with pytest.raises(ValueError):
        IMPLS[impl](x, y, reduction="sum", num_items_in_batch=k)


@pytest.mark.parametrize("layout", ["strided_cols", "transposed", "row_padded"])
def test_non_contiguous_logits(layout):
    x, y = make(37, 1000)
    if layout == "strided_cols":
        base = torch.zeros(37, 2000)
        base[:, ::2] = x
        xv = base[:, ::2]
    elif layout == "transposed":
        xv = x.t().contiguous().t()
    else:
        base = torch.zeros(37, 1100)
        base[:, 50:1050] = x
        xv = base[:, 50:1050]
    assert not xv.is_contiguous()
    xv = xv.detach().requires_grad_(True)
    loss = _cross_entropy_triton(xv, y, softcap=4.0)
    loss.backward()
    gl, gg = run_and_grad(gold_ce, x.double(), y, softcap=4.0)
    close32(loss.detach(), gl)
    close32(xv.grad, gg)


def test_batched_shape_and_int32_labels():
    x, y = make(2 * 7, 500, ignored=(4,))
    up = torch.rand(2 * 7) + 0.5
    x3 = x.reshape(2, 7, 500)
    y3 = y.reshape(2, 7).to(torch.int32)
    rows, grad = run_and_grad(_cross_entropy_triton, x3, y3, up.reshape(2, 7), reduction="none")
    assert rows.shape == (2, 7) and grad.shape == (2, 7, 500)
    gl, gg = run_and_grad(gold_ce, x.double(), y, up.double(), reduction="none")
    close32(rows.reshape(-1), gl)
    close32(grad.reshape(-1, 500), gg)


def test_nan_poisoned_buffers_are_fully_written(monkeypatch):
    monkeypatch.setenv("COREPT_KERNELS_POISON", "1")
    assert torch.isnan(ce_mod.new_buffer((3,), torch.float32, "cpu")).all()  # poison is on
    x, y = make(37, 1000, ignored=(0, 5, 36))
    for dtype in (torch.float32, torch.bfloat16):
        rows, grad = run_and_grad(_cross_entropy_triton, x.to(dtype), y, torch.ones(37),
                                  reduction="none", label_smoothing=0.1)
        assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
        assert (rows[[0, 5, 36]] == 0).all() and (grad[[0, 5, 36]] == 0).all()


def test_out_of_range_label_gives_nan_loss():
    x, y = make(4, 100, ignored=())
    y[2] = 100
    rows = _cross_entropy_triton(x, y, reduction="none")
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernels)")


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("logit_scale", [0.25, 3.0])
def test_logit_scale_fp32(impl, softcap, logit_scale, dev, monkeypatch):
    """``logit_scale * logits`` (then the softcap) against F.cross_entropy of explicitly scaled
    float64 logits; 256-wide blocks run the chunked vocabulary loop (V=1000, ragged end)."""
    monkeypatch.setitem(ce_mod.MAX_BLOCK, dev, 256)
    x, y = (t.to(dev) for t in make(37, 1000, scale=1.0))
    up = torch.rand(37, dtype=torch.float64, device=dev) + 0.5
    kw = dict(softcap=softcap, label_smoothing=0.1, reduction="none")
    loss, grad = run_and_grad(IMPLS[impl], x, y, up.float(), logit_scale=logit_scale, **kw)

    def scaled_first(xx, yy, **k):  # the scale applied outside, in float64
        return gold_ce(xx * logit_scale, yy, **k)

    gl, gg = run_and_grad(scaled_first, x.double(), y, up, **kw)
    close32(loss, gl)
    close32(grad, gg)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_logit_scale_bf16(softcap):
    """bf16 logits: the scale multiplies their fp32 upcast in the kernel; judged against float64
    gold by the bound of torch computing ``logits * scale`` in bf16 (HF's order)."""
    x, y = make(37, 1000, torch.bfloat16, scale=1.0)
    s = 1 / 0.3
    loss, grad = run_and_grad(_cross_entropy_triton, x, y, logit_scale=s, softcap=softcap)
    gl, gg = run_and_grad(gold_ce, x.double(), y, logit_scale=s, softcap=softcap)
    tl_, tg = run_and_grad(lambda xx, yy: gold_ce((xx * s).float(), yy, softcap=softcap), x, y)
    assert grad.dtype == torch.bfloat16
    assert_low_precision_ok(loss, gl, tl_, "loss")
    assert_low_precision_ok(grad, gg, tg, "dlogits")


def test_bad_options_raise():
    x, y = make(4, 100)
    for kw in [{"reduction": "avg"}, {"softcap": 0.0}, {"label_smoothing": 1.5}, {"z_loss": -1.0},
               {"logit_scale": float("inf")}, {"logit_scale": float("nan")}]:
        for fn in IMPLS.values():
            with pytest.raises(ValueError):
                fn(x, y, **kw)


def test_dispatch_and_registration(monkeypatch):
    info = capabilities.get("cross_entropy")
    assert info.has_backward and info.compile_safe and info.devices == ("cuda",)
    assert info.reference_fn is ref.cross_entropy
    x, y = make(6, 50, ignored=())
    launches = []
    real = ce_mod.launch_forward
    monkeypatch.setattr(ce_mod, "launch_forward", lambda *a, **k: launches.append(1) or real(*a, **k))
    close32(cross_entropy(x, y), gold_ce(x, y))
    assert launches == [1]  # interpreter on: the Triton path ran
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fn, reason = capabilities.dispatch("cross_entropy", x, y)
    assert fn is ref.cross_entropy and "TRITON_INTERPRET" in reason
    close32(cross_entropy(x, y), gold_ce(x, y))
    assert launches == [1]  # interpreter off: the torch twin answered
