"""rms_norm / layer_norm (Triton, through the interpreter) vs float64 gold, HF's norms and torch."""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from corept_kernels import capabilities, norms
from corept_kernels.norms import layer_norm, rms_norm
from corept_kernels.torch_ref import norms as ref
from tolerances import assert_close_fp32, assert_low_precision_ok

EPS = 1e-6


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(norms, "POISON_OUTPUTS", True)


def _x(shape, dtype, layout):
    """A ``shape`` tensor that is contiguous, a transposed copy-needing view, or a row-strided slice."""
    *lead, H = shape
    if layout == "transposed":
        return torch.randn(lead[::-1] + [H], dtype=torch.float64).permute(
            *reversed(range(len(lead))), len(lead)).to(dtype)
    if layout == "sliced":
        return torch.randn(lead + [H + 7], dtype=torch.float64).to(dtype)[..., 3:H + 3]
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def _leaf(t):
    """A leaf copy of ``t`` with the same strides (``clone`` would compact a sliced view)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t).requires_grad_()


def _run(fn, inputs, dy):
    """Forward + backward of ``fn`` on leaf copies of ``inputs``: (out, [grads...])."""
    leaves = [None if t is None else _leaf(t) for t in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _gold_rms(x, w, offset):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * (offset + w.double())


def _hf_module(casting, H, weight):
    """HF's norm with ``casting``'s numerics: LlamaRMSNorm (scale_after_cast), GemmaRMSNorm
    (scale_in_fp32, offset 1)."""
    mod = LlamaRMSNorm(H, eps=EPS) if casting == "scale_after_cast" else GemmaRMSNorm(H, eps=EPS)
    mod = mod.to(weight.dtype)
    with torch.no_grad():
        mod.weight.copy_(weight)
    return lambda x, w: torch.func.functional_call(mod, {"weight": w}, (x,))


CASES = [("scale_after_cast", 0.0), ("scale_in_fp32", 1.0), ("none", 0.0), ("scale_after_cast", 1.0)]


@pytest.mark.parametrize("casting,offset", CASES)
@pytest.mark.parametrize("shape,layout", [((3, 37, 123), "contiguous"), ((111, 64), "sliced"),
                                          ((4, 5, 257), "transposed"), ((6, 2049), "contiguous")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_vs_gold(casting, offset, shape, layout, dtype):
    x = _x(shape, dtype, layout)
    w = (torch.randn(shape[-1], dtype=torch.float64) * 0.5 + (0.0 if offset else 1.0)).to(dtype)
    fn = lambda x, w: rms_norm(x, w, EPS, offset=offset, casting=casting)  # noqa: E731
    out_dtype = ref.rms_norm_out_dtype(x, w, casting)
    dy = torch.randn(shape, dtype=torch.float64).to(out_dtype)
    out, (dx, dw) = _run(fn, [x, w], dy)
    gold, (gdx, gdw) = _run(lambda x, w: _gold_rms(x, w, offset), [x.double(), w.double()], dy.double())
    assert out.dtype == out_dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
    if dtype == torch.float32:
        for got, want in ((out, gold), (dx, gdx), (dw, gdw)):
            assert_close_fp32(got, want)
        return
    # Torch's own low-precision version: HF's module where one exists, else the twin in x.dtype.
    if casting != "none" and offset == (1.0 if casting == "scale_in_fp32" else 0.0):
        lowp = _hf_module(casting, shape[-1], w)
    else:
        lowp = lambda x, w: ref.rms_norm(x, w, EPS, offset=offset, casting=casting)  # noqa: E731
    low, (ldx, ldw) = _run(lowp, [x, w], dy)
    for name, got, want, torch_low in (("y", out, gold, low), ("dx", dx, gdx, ldx), ("dw", dw, gdw, ldw)):
        assert_low_precision_ok(got, want, torch_low, f"{casting} {name}")


@pytest.mark.parametrize("casting", ["scale_after_cast", "scale_in_fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_hf_module(casting, dtype):
    """The torch twin agrees with HF's norm bit for bit; the kernel to 1 ulp per bf16 rounding (the
    interpreter truncates where the GPU rounds to nearest; scale_after_cast rounds twice: x_normed,
    then y)."""
    H = 123
    x = torch.randn(2, 9, H, dtype=dtype)
    w = torch.randn(H, dtype=dtype)
    offset = 1.0 if casting == "scale_in_fp32" else 0.0
    want = _hf_module(casting, H, w)(x, w).detach()
    got = rms_norm(x, w, EPS, offset=offset, casting=casting)
    twin = ref.rms_norm(x, w, EPS, offset=offset, casting=casting)
    assert got.dtype == want.dtype == twin.dtype
    assert torch.equal(twin, want)
    roundings = 2 if casting == "scale_after_cast" else 1
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -22
    torch.testing.assert_close(got, want, rtol=roundings * ulp, atol=1e-6)


def test_scale_after_cast_fp32_weight_on_bf16_input_gives_fp32_like_hf():
    x = torch.randn(4, 50, dtype=torch.bfloat16)
    w = torch.randn(50)
    want = _hf_module("scale_after_cast", 50, w)(x, w).detach()
    got = rms_norm(x, w, EPS)
    assert want.dtype == got.dtype == torch.float32
    # x_normed is rounded to bf16 first (truncated here): 1 bf16 ulp relative.
    torch.testing.assert_close(got, want, rtol=2.0 ** -7, atol=1e-6)


def _to_bf16(t, mode):
    """fp32 -> bf16 -> fp32 with round-to-nearest-even (GPU, torch) or truncation (interpreter)."""
    if mode == "rtne":
        return t.to(torch.bfloat16).float()
    return (t.view(torch.int32) & -65536).view(torch.float32)


def test_scale_after_cast_rounds_normed_x_before_the_weight():
    """bf16 x with an fp32 weight: y is fp32, so the only rounding left is that of x_normed to bf16,
    and dW must be sum(dy * x_normed_in_bf16) as HF's autograd computes it."""
    x = torch.randn(96, 50, dtype=torch.bfloat16) * 3
    w = torch.randn(50) * 2
    dy = torch.randn(96, 50)
    y, (_, dw) = _run(lambda x, w: rms_norm(x, w, EPS), [x, w], dy)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    # Whichever bf16 rounding this backend uses, the kernel must match it, not the unrounded value.
    mode = min(("rtne", "trunc"), key=lambda m: (y - w * _to_bf16(normed, m)).abs().max().item())
    normed_bf16 = _to_bf16(normed, mode)
    off = ~torch.isclose(y, w * normed_bf16, rtol=1e-6, atol=1e-6)
    # rstd may differ from torch's in the last fp32 bit and flip a rare rounding by 1 bf16 ulp.
    assert off.float().mean() < 0.01, f"{off.sum()} of {off.numel()} elements not rounded like {mode}"
    assert_close_fp32(y, w * normed_bf16, rtol=2.0 ** -7, atol=0)
    want_dw = (dy.double() * normed_bf16.double()).sum(0)
    assert (dw.double() - want_dw).abs().max() <= 1e-5 * want_dw.abs().max()


def test_sandwich_norms_with_residual():
    """Gemma2/3 order: pre-norm -> op -> post-norm -> residual add -> pre-norm; every grad exact."""
    H = 37

    def block(x, w1, w2, w3, lin, norm):
        h = norm(torch.tanh(norm(x, w1) @ lin), w2)
        h = x + h
        return h + norm(h, w3) * 0.5

    def ours(t, w):
        return rms_norm(t, w, EPS, offset=1.0, casting="scale_in_fp32")

    def gold(t, w):
        return _gold_rms(t, w, 1.0)

    inputs = [torch.randn(3, 5, H), *(torch.randn(H) * 0.1 for _ in range(3)), torch.randn(H, H) / H ** 0.5]
    dy = torch.randn(3, 5, H)
    dy_before = dy.clone()
    out, grads = _run(lambda x, a, b, c, lin: block(x, a, b, c, lin, ours), inputs, dy)
    gout, ggrads = _run(lambda x, a, b, c, lin: block(x, a, b, c, lin, gold),
                        [t.double() for t in inputs], dy.double())
    assert torch.equal(dy, dy_before), "backward wrote into the incoming gradient"
    assert_close_fp32(out, gout)
    for got, want in zip(grads, ggrads):
        assert_close_fp32(got, want)


def test_rms_norm_backward_leaves_inputs_and_grad_untouched():
    x = torch.randn(8, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    dy = torch.randn(8, 40)
    saved = (x.detach().clone(), w.detach().clone(), dy.clone())
    y = rms_norm(x, w, EPS)
    torch.autograd.grad(y, (x, w), dy)
    assert all(torch.equal(a, b) for a, b in zip((x.detach(), w.detach(), dy), saved))


def test_rms_norm_frozen_weight_and_expanded_grad():
    """Frozen weight (LoRA): no weight grad; the grad of ``.sum()`` arrives as a stride-0 tensor."""
    x = torch.randn(5, 3, 77, requires_grad=True)
    w = torch.randn(77)
    rms_norm(x, w, EPS, casting="scale_in_fp32", offset=1.0).sum().backward()
    x64 = x.detach().double().requires_grad_()
    _gold_rms(x64, w, 1.0).sum().backward()
    assert w.grad is None
    assert_close_fp32(x.grad, x64.grad)


@pytest.mark.parametrize("shape,layout", [((3, 37, 123), "contiguous"), ((111, 64), "sliced"),
                                          ((4, 5, 257), "transposed")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_vs_gold(shape, layout, dtype, with_bias):
    H = shape[-1]
    x = _x(shape, dtype, layout) * 2 + 0.5
    w = (torch.randn(H, dtype=torch.float64) * 0.5 + 1).to(dtype)
    b = torch.randn(H, dtype=torch.float64).to(dtype) if with_bias else None
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    out, grads = _run(lambda x, w, b: layer_norm(x, w, b, 1e-5), [x, w, b], dy)
    gold, ggrads = _run(lambda x, w, b: F.layer_norm(x, (H,), w, b, 1e-5),
                        [x.double(), w.double(), None if b is None else b.double()], dy.double())
    assert out.dtype == dtype
    if dtype == torch.float32:
        assert_close_fp32(out, gold)
        for got, want in zip(grads, ggrads):
            assert (got is None) == (want is None)
            if got is not None:
                assert_close_fp32(got, want)
        return
    low, lgrads = _run(lambda x, w, b: F.layer_norm(x, (H,), w, b, 1e-5), [x, w, b], dy)
    assert_low_precision_ok(out, gold, low, "y")
    for name, got, want, lg in zip("xwb", grads, ggrads, lgrads):
        if want is not None:
            assert_low_precision_ok(got, want, lg, f"d{name}")


def test_registered_and_falls_back_without_interpreter(monkeypatch):
    for name in ("rms_norm", "layer_norm"):
        info = capabilities.get(name)
        assert info.has_backward and info.compile_safe and info.devices == ("cuda",)
    x, w = torch.randn(3, 10), torch.randn(10)
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def boom(*a, **k):
        raise AssertionError("Triton path taken without the interpreter")

    monkeypatch.setattr(norms._RMSNormFn, "apply", boom)
    monkeypatch.setattr(norms._LayerNormFn, "apply", boom)
    assert torch.equal(rms_norm(x, w, EPS, casting="scale_in_fp32", offset=1.0),
                       ref.rms_norm(x, w, EPS, casting="scale_in_fp32", offset=1.0))
    assert torch.equal(layer_norm(x, w, None, 1e-5), F.layer_norm(x, (10,), w, None, 1e-5))
    for casting in ("bogus", "llama", "gemma"):  # the architecture-named modes are gone
        with pytest.raises(ValueError, match="casting must be one of"):
            rms_norm(x, w, EPS, casting=casting)
