"""swiglu / geglu (Triton, through the interpreter) vs float64 gold and torch's own bf16 math."""
import pytest
import torch
import torch.nn.functional as F

from corept_kernels import capabilities, glu
from corept_kernels.glu import geglu, swiglu
from corept_kernels.torch_ref import glu as ref
from tolerances import assert_close_fp32, assert_low_precision_ok


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(glu, "POISON_OUTPUTS", True)


OPS = {
    "swiglu": (swiglu, lambda g, u: F.silu(g) * u),
    "geglu_tanh": (lambda g, u: geglu(g, u, "tanh"), lambda g, u: F.gelu(g, approximate="tanh") * u),
    "geglu_erf": (lambda g, u: geglu(g, u, "none"), lambda g, u: F.gelu(g) * u),
}


def _inputs(shape, dtype, layout):
    """(gate, up) of ``shape``: separate contiguous tensors, the two halves of one fused gate_up
    projection (row-strided views), or transposed views (no unit stride: copied internally)."""
    *lead, N = shape
    if layout == "fused":
        gu = torch.randn(lead + [2 * N], dtype=torch.float64).mul(3).to(dtype)
        return gu[..., :N], gu[..., N:]
    if layout == "transposed":
        g = torch.randn([N] + lead, dtype=torch.float64).mul(3).to(dtype)
        u = torch.randn([N] + lead, dtype=torch.float64).to(dtype)
        perm = list(range(1, len(lead) + 1)) + [0]
        return g.permute(perm), u.permute(perm)
    return (torch.randn(shape, dtype=torch.float64).mul(3).to(dtype),
            torch.randn(shape, dtype=torch.float64).to(dtype))


def _leaf(t):
    """A leaf copy of ``t`` with the same strides (``clone`` would compact a sliced view)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t).requires_grad_()


def _run(fn, g, u, dy):
    g, u = _leaf(g), _leaf(u)
    out = fn(g, u)
    out.backward(dy)
    return out.detach(), g.grad, u.grad


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape,layout", [((3, 37, 123), "contiguous"), ((5, 257), "fused"),
                                          ((2, 9, 33), "transposed"), ((1, 4100), "contiguous")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glu_vs_gold(op, shape, layout, dtype):
    ours, torch_fn = OPS[op]
    g, u = _inputs(shape, dtype, layout)
    g_in, u_in = g.clone(), u.clone()
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    got = _run(ours, g, u, dy)
    assert torch.equal(g, g_in) and torch.equal(u, u_in), "inputs modified"
    gold = _run(torch_fn, g.double(), u.double(), dy.double())
    assert [t.dtype for t in got] == [dtype] * 3
    if dtype == torch.float32:
        for a, b in zip(got, gold):
            assert_close_fp32(a, b)
        return
    low = _run(torch_fn, g, u, dy)  # what HF computes in bf16
    for name, a, b, lo in zip(("y", "dgate", "dup"), got, gold, low):
        assert_low_precision_ok(a, b, lo, f"{op} {name}")


@pytest.mark.parametrize("op", list(OPS))
def test_glu_strided_grad_and_tails(op):
    """Large |gate| (saturated sigmoid / tanh / erf) and a stride-0 incoming grad from ``.sum()``."""
    ours, torch_fn = OPS[op]
    g = torch.linspace(-30, 30, 2 * 3 * 41).reshape(2, 3, 41)
    u = torch.randn(2, 3, 41)
    gl, ul = g.clone().requires_grad_(), u.clone().requires_grad_()
    out = ours(gl, ul)
    out.sum().backward()
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    want = torch_fn(g64, u64)
    want.sum().backward()
    assert_close_fp32(out, want)
    assert_close_fp32(gl.grad, g64.grad)
    assert_close_fp32(ul.grad, u64.grad)


def test_glu_twins_and_fallback(monkeypatch):
    for name in ("swiglu", "geglu"):
        info = capabilities.get(name)
        assert info.has_backward and info.compile_safe and info.devices == ("cuda",)
    g, u = torch.randn(4, 19), torch.randn(4, 19)
    assert_close_fp32(ref.swiglu(g, u), F.silu(g.double()) * u.double())
    assert_close_fp32(ref.geglu(g, u, "none"), F.gelu(g.double()) * u.double())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(glu._GluFn, "apply", lambda *a: pytest.fail("Triton path without interpreter"))
    assert torch.equal(swiglu(g, u), ref.swiglu(g, u))
    assert torch.equal(geglu(g, u), ref.geglu(g, u, "tanh"))
    with pytest.raises(ValueError):
        geglu(g, u, "sigmoid")
    with pytest.raises(ValueError):
        swiglu(g, u[:, :5])
