"""The tuned CUDA launch paths (Triton's autotuner picks warps / programs per SM) against float64.

The interpreter tests (CPU) cover the kernels' arithmetic with the default launch; these cover
what only a GPU runs: every autotuning candidate writing the same outputs, the partial-row buffers
re-zeroed between candidates, and a second call reusing the cached config. Run them on a GPU with
``TRITON_INTERPRET=0 pytest kernels/tests/test_cuda_launch.py``.
"""
import pytest
import torch

from corept_kernels import capabilities, norms
from corept_kernels.norms import layer_norm, rms_norm
from tolerances import assert_close_fp32, assert_low_precision_ok

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or capabilities.interpreter_active(),
    reason="needs a CUDA GPU with TRITON_INTERPRET=0 (tuned launches run on CUDA only; the "
           "interpreter twins of these tests are in test_norms.py)")

EPS = 1e-6


def _grads(fn, inputs, dy):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _gold_rms(x, w, offset):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * (offset + w)


def _check(kernel_fn, gold_fn, lowp_fn, inputs, dtype):
    dev = inputs[0].device
    out0 = kernel_fn(*inputs)
    dy = torch.randn(out0.shape, device=dev, dtype=torch.float64)
    got = _grads(kernel_fn, inputs, dy.to(out0.dtype))
    gold = _grads(gold_fn, [None if t is None else t.double() for t in inputs], dy)
    again = _grads(kernel_fn, inputs, dy.to(out0.dtype))  # the cached config: same results
    for a, b in zip([got[0], *got[1]], [again[0], *again[1]]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    pairs = [(got[0], gold[0])] + [(g, w) for g, w in zip(got[1], gold[1]) if g is not None]
    if dtype == torch.float32:
        for g, w in pairs:
            assert_close_fp32(g, w, rtol=1e-4, atol=1e-4)
        return
    low = _grads(lowp_fn, inputs, dy.to(out0.dtype))
    lows = [low[0]] + [g for g in low[1] if g is not None]
    for (g, w), lo in zip(pairs, lows):
        assert_low_precision_ok(g, w, lo)


@pytest.mark.parametrize("H", [4096, 1000, 128])
@pytest.mark.parametrize("M", [1, 37, 8195])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("casting,offset", [("scale_after_cast", 0.0), ("scale_in_fp32", 1.0)])
def test_rms_norm_tuned(H, M, dtype, casting, offset):
    x = torch.randn(M, H, device="cuda", dtype=dtype)
    w = (torch.randn(H, device="cuda") * 0.5 + 1.0 - offset).to(dtype)
    _check(lambda x, w: rms_norm(x, w, EPS, offset=offset, casting=casting),
           lambda x, w: _gold_rms(x, w, offset),
           lambda x, w: norms.ref.rms_norm(x, w, EPS, offset=offset, casting=casting), [x, w], dtype)
    assert norms._LAUNCH["rms_bwd"].best() is not None, "the CUDA path did not go through the tuner"


@pytest.mark.parametrize("H", [4096, 1000])
@pytest.mark.parametrize("M", [37, 8195])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_tuned(H, M, dtype, bias):
    x = torch.randn(M, H, device="cuda", dtype=dtype) * 2 + 0.5
    w = torch.randn(H, device="cuda", dtype=dtype)
    b = torch.randn(H, device="cuda", dtype=dtype) if bias else None
    gold = lambda x, w, b: torch.nn.functional.layer_norm(x, (H,), w, b, EPS)  # noqa: E731
    _check(lambda x, w, b: layer_norm(x, w, b, EPS), gold, gold, [x, w, b], dtype)
    assert norms._LAUNCH["ln_bwd"].best() is not None, "the CUDA path did not go through the tuner"


def _rope_gold(q, k, cos, sin):
    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), -1)

    c, s = cos[:, None], sin[:, None]
    return q * c + rot(q) * s, k * c + rot(k) * s


@pytest.mark.parametrize("Hq,Hk,D", [(32, 8, 128), (16, 2, 256), (12, 4, 64)])
@pytest.mark.parametrize("S", [37, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tuned(Hq, Hk, D, S, dtype):
    import importlib

    from corept_kernels import rope as rope_fn  # the function; the module is imported below

    rope_mod = importlib.import_module("corept_kernels.rope")
    B = 2
    pos = torch.randint(0, 4096, (B, S), device="cuda").double()
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float64) / D)
    emb = torch.cat([pos[..., None] * inv] * 2, -1)
    cos, sin = emb.cos(), emb.sin()
    q = torch.randn(B, S, Hq, D, device="cuda", dtype=dtype).transpose(1, 2)  # HF's layout
    k = torch.randn(B, S, Hk, D, device="cuda", dtype=dtype).transpose(1, 2)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def run(fn, q, k, cos, sin, dq, dk):
        q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        qo, ko = fn(q, k, cos, sin)
        torch.autograd.backward((qo, ko), (dq, dk))
        return [qo.detach(), ko.detach(), q.grad, k.grad]

    got = run(rope_fn, q, k, cos.to(dtype), sin.to(dtype), dq, dk)
    again = run(rope_fn, q, k, cos.to(dtype), sin.to(dtype), dq, dk)
    for a, b in zip(got, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    gold = run(_rope_gold, q.double(), k.double(), cos, sin, dq.double(), dk.double())
    if dtype == torch.float32:
        for g, w in zip(got, gold):
            assert_close_fp32(g, w, rtol=1e-4, atol=1e-4)
    else:
        low = run(_rope_gold, q, k, cos.to(dtype), sin.to(dtype), dq, dk)
        for g, w, lo in zip(got, gold, low):
            assert_low_precision_ok(g, w, lo)
            assert torch.equal(g, lo), "bf16 rope must round where transformers rounds (bitwise)"
    assert any(l.best() is not None for l in rope_mod._LAUNCHERS.values()), "rope did not go through the tuner"
