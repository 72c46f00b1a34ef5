"""expert_linear (grouped expert GEMM + per-expert LoRA) vs autograd through its float64 twin.

Odd shapes (K 37, M 53, r 3, five experts, two of them without rows), both weight layouts, with and
without bias and LoRA, frozen and trainable weight: outputs and every gradient. fp32 tightly; bf16
by the project's rule (error <= 2x torch's bf16 error + 1 ulp, :mod:`tolerances`). The
``torch._grouped_mm`` path runs on CUDA where it exists (skipped otherwise) and, as a CPU twin,
through torch's CPU ``_grouped_mm`` with the device probe bypassed. Outputs start NaN-poisoned.
"""
from __future__ import annotations

import pytest
import torch

import corept_kernels as ck
from corept_kernels import capabilities, grouped_gemm as gg
from corept_kernels.ops import experts
from corept_kernels.ops.experts import expert_linear, expert_linear_reference
from tolerances import assert_close_fp32, assert_low_precision_ok

DEVICE = "cuda" if torch.cuda.is_available() and not ck.interpreter_active() else "cpu"
E, K, M, R = 5, 37, 53, 3
COUNTS = (7, 0, 13, 0, 9)
NAMES = ("y", "dx", "dw", "da", "db", "dbias")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(gg, "POISON_OUTPUTS", True)
    with torch.device(DEVICE):
        yield


def _problem(transposed, lora=True, bias=True, counts=COUNTS, k=K, m=M, r=R):
    """float64 inputs: ``x [N, k]``, ``offsets``, the weight in its layout, LoRA factors, bias, ``dy``."""
    n = sum(counts)
    return dict(x=torch.randn(n, k, dtype=torch.float64),
                offsets=torch.tensor(counts).cumsum(0).to(torch.int32),
                weight=torch.randn((E, k, m) if transposed else (E, m, k), dtype=torch.float64) / k ** 0.5,
                lora_a=torch.randn(E, r, k, dtype=torch.float64) / k ** 0.5 if lora else None,
                lora_b=torch.randn(E, m, r, dtype=torch.float64) if lora else None,
                bias=torch.randn(E, m, dtype=torch.float64) if bias else None,
                dy=torch.randn(n, m, dtype=torch.float64), transposed=transposed)


def _run(fn, p, dtype, base_grad, scaling=0.7):
    """``{name: tensor or None}``: ``y`` and the gradients of one backward of ``dy``. The weight and
    bias (base parameters) require grad only with ``base_grad``; x and the LoRA factors always."""
    def leaf(t, grad=True):
        return None if t is None else t.detach().to(dtype).requires_grad_(grad)
    x, a, b = leaf(p["x"]), leaf(p["lora_a"]), leaf(p["lora_b"])
    w, bias = leaf(p["weight"], base_grad), leaf(p["bias"], base_grad)
    y = fn(x, p["offsets"], w, a, b, scaling, bias, p["transposed"])
    y.backward(p["dy"].to(dtype))
    return dict(zip(NAMES, [y.detach()] + [None if t is None else t.grad for t in (x, w, a, b, bias)]))


def _compare(got, gold, low=None):
    for name in NAMES:
        if gold[name] is None:
            assert got[name] is None, name
        elif low is None:
            assert got[name].dtype == torch.float32
            assert_close_fp32(got[name], gold[name], rtol=1e-5, atol=1e-5)
        else:
            assert_low_precision_ok(got[name], gold[name], low[name], name)


CASES = [  # dtype, transposed, lora, bias, base_grad
    (torch.float32, False, True, True, True),
    (torch.float32, True, True, False, False),
    (torch.float32, False, False, True, False),
    (torch.float32, True, False, True, True),
    (torch.bfloat16, True, True, True, True),
    (torch.bfloat16, False, True, False, False),
]


@pytest.mark.parametrize("dtype,transposed,lora,bias,base_grad", CASES)
def test_matches_reference(dtype, transposed, lora, bias, base_grad, monkeypatch):
    ran = []
    real = experts.ragged_mm
    monkeypatch.setattr(experts, "ragged_mm", lambda p, q, *a, **kw: ran.append((p.shape[1], q.shape[1]))
                        or real(p, q, *a, **kw))
    p = _problem(transposed, lora, bias)
    got = _run(expert_linear, p, dtype, base_grad)
    gold = _run(expert_linear_reference, p, torch.float64, base_grad)
    _compare(got, gold, None if dtype == torch.float32 else _run(expert_linear_reference, p, dtype, base_grad))
    # a frozen base costs no gradient GEMM: only dA [r, K] and dB [M, r] contract over the rows
    want = [(R, K), (M, R)] if lora else []
    want += [((K, M) if transposed else (M, K)), (M, 1)][:2 if bias else 1] if base_grad else []
    assert sorted(ran) == sorted(want)


@pytest.mark.parametrize("transposed", [False, True])
def test_stored_weight_is_dequantized_again_in_the_backward(transposed):
    """``dequantize=``: a frozen weight kept in another form (a scaled int8 stand-in for a 4-bit one)
    gives the dense weight's results, and the kernel path calls ``dequantize`` in the forward and
    again in the backward instead of saving the dense weight (saved-tensor hooks never see it)."""
    p = _problem(transposed, bias=False)
    stored = (p["weight"] * 64).round().clamp(-127, 127).to(torch.int8)
    calls = []

    def dequantize(w):
        calls.append(w)
        return w.to(torch.float32) / 64

    dense = dict(p, weight=stored.to(torch.float64) / 64)
    gold = _run(expert_linear_reference, dense, torch.float64, False)
    x, a, b = (p[n].detach().float().requires_grad_() for n in ("x", "lora_a", "lora_b"))
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        y = expert_linear(x, p["offsets"], stored, a, b, 0.7, transposed=transposed, dequantize=dequantize)
    y.backward(p["dy"].float())
    got = dict(y=y.detach(), dx=x.grad, dw=None, da=a.grad, db=b.grad, dbias=None)
    _compare(got, gold)
    assert len(calls) == 2 and all(c is stored for c in calls)
    assert not any(t.dtype == torch.float32 and t.shape == stored.shape for t in seen)


def test_several_tiles_per_expert(monkeypatch):
    """16-wide blocks: several row tiles per expert, column tiles and contraction steps."""
    monkeypatch.setattr(gg, "BLOCKS_OFF_CUDA", (16, 16, 16))
    p = _problem(False, counts=(40, 0, 3, 17, 0))
    _compare(_run(expert_linear, p, torch.float32, True), _run(expert_linear_reference, p, torch.float64, True))


def test_no_rows_at_all():
    p = _problem(True, counts=(0,) * E)
    fn, reason = capabilities.dispatch("expert_linear", p["x"].float(), p["weight"].float(), None, None, None,
                                       p["offsets"])
    assert fn is expert_linear_reference and "empty" in reason
    got = _run(expert_linear, p, torch.float32, True)
    assert got["y"].shape == (0, M) and got["dx"].shape == (0, K)
    for name in ("dw", "da", "db", "dbias"):
        assert got[name].shape == p["weight" if name == "dw" else {"da": "lora_a", "db": "lora_b",
                                                                   "dbias": "bias"}[name]].shape
        assert not got[name].any(), name


def test_float64_runs_the_twin():
    p = _problem(False)
    fn, reason = capabilities.dispatch("expert_linear", p["x"], p["weight"], p["lora_a"], p["lora_b"], p["bias"],
                                       p["offsets"])
    assert fn is expert_linear_reference and "float64" in reason
    info = capabilities.get("expert_linear")
    assert info.has_backward and info.compile_safe and ck.expert_linear is expert_linear


def test_arguments_are_checked():
    p = _problem(False)
    x, offs, w, a, b = p["x"], p["offsets"], p["weight"], p["lora_a"], p["lora_b"]
    with pytest.raises(ValueError, match="come together"):
        expert_linear(x, offs, w, a, None)
    with pytest.raises(ValueError, match="takes"):
        expert_linear(x, offs, w, transposed=True)
    with pytest.raises(ValueError, match="int32"):
        expert_linear(x, offs.long(), w)
    with pytest.raises(ValueError, match="one dtype"):
        expert_linear(x.float(), offs, w)
    with pytest.raises(ValueError, match="lora_a must be"):
        expert_linear(x, offs, w, b.transpose(1, 2), a.transpose(1, 2))
    with pytest.raises(ValueError, match="end at the row count"):
        expert_linear_reference(x, offs - 1, w)
    # adapters in another dtype are cast to x's, differentiably (peft's get_delta_factors does the same)
    a32, b32 = a.float().requires_grad_(), b.float().requires_grad_()
    expert_linear(x.float(), offs, w.float(), a32, b32, 0.5).sum().backward()
    assert a32.grad.dtype == torch.float32 and b32.grad is not None


# ----------------------------------------------------------------------------- torch._grouped_mm


def _grouped_mm_case(monkeypatch, r):
    """bf16 with aligned K, M (and r when 8): the torch._grouped_mm path; calls counted."""
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    p = _problem(True, k=32, m=48, r=r)
    got = _run(expert_linear, p, torch.bfloat16, True)
    _compare(got, _run(expert_linear_reference, p, torch.float64, True),
             _run(expert_linear_reference, p, torch.bfloat16, True))
    return len(calls)


@pytest.mark.parametrize("r", [8, 3])
def test_torch_grouped_mm_path_cpu_twin(r, monkeypatch):
    """The glue around ``torch._grouped_mm`` (layouts, scaling, bias, mixing with Triton for an
    unaligned rank) through torch's CPU implementation, the CUDA probe bypassed."""
    if DEVICE != "cpu":
        pytest.skip("the CPU twin of the CUDA test below")
    monkeypatch.setattr(gg, "torch_grouped_mm_ok", lambda device: True)
    # r 8: xa, y (base + up), dxa, dx (base + down), dA, dB, dW; dbias is Triton (stride-0 ones).
    # r 3: the base GEMMs (y, dx), dW and xa = x @ A^T (A^T's stride is K); the rest is Triton.
    assert _grouped_mm_case(monkeypatch, r) == (9 if r == 8 else 4)


@pytest.mark.skipif(not torch.cuda.is_available() or ck.interpreter_active(),
                    reason="torch._grouped_mm's fast path needs CUDA (and TRITON_INTERPRET unset)")
def test_torch_grouped_mm_path_cuda(monkeypatch):
    if not gg.torch_grouped_mm_ok(torch.device("cuda")):
        pytest.skip("torch._grouped_mm has no fast path on this GPU (or failed its probe)")
    assert _grouped_mm_case(monkeypatch, 8) == 9
    monkeypatch.setattr(gg, "TORCH_GROUPED_MM", False)  # the Triton kernels in bf16 on the GPU
    assert _grouped_mm_case(monkeypatch, 8) == 0


def test_the_grouped_mm_probe_runs_under_a_callers_default_device(monkeypatch):
    """The probe draws its inputs from a CPU generator: a caller's ``with torch.device(...)`` (a
    CUDA one failed on the GPU: "Expected a 'cuda' device type for generator") must not move them.
    Run here through torch's CPU ``_grouped_mm`` with the capability check bypassed."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with torch.device("meta"):
        assert gg._probe(torch.device("cpu")) is True


def test_grouped_mm_alignment_rules(monkeypatch):
    monkeypatch.setattr(gg, "torch_grouped_mm_ok", lambda device: True)
    x, w = torch.randn(9, 48, dtype=torch.bfloat16), torch.randn(4, 32, 48, dtype=torch.bfloat16)
    assert gg._gm_rows_ok(x, w.transpose(1, 2)) and gg._gm_rows_ok(x[:, :32], w)
    x37, w37 = torch.randn(9, 37, dtype=torch.bfloat16), torch.randn(4, 48, 37, dtype=torch.bfloat16)
    assert not gg._gm_rows_ok(x37, w37.transpose(1, 2)) and not gg._gm_rows_ok(x, w37)  # strides of 37
    assert not gg._gm_rows_ok(x[:, 1:33], w)  # misaligned pointer
    assert not gg._gm_rows_ok(x.t().contiguous().t(), w.transpose(1, 2))  # column-major ragged rows
    assert not gg._gm_rows_ok(x.half(), w.transpose(1, 2).half())  # fp16: no fast path
    assert gg._gm_ragged_ok(x, x[:, :8], 4) and not gg._gm_ragged_ok(x, x[:, :8], 1024)
    assert not gg._gm_ragged_ok(x, torch.ones(1, 1, dtype=torch.bfloat16).expand(9, 1), 4)


# ----------------------------------------------------------------------------- torch.compile


def _fn(p):
    return lambda x, w, a, b, bias: expert_linear(x, p["offsets"], w, a, b, 0.7, bias, p["transposed"])


@pytest.mark.parametrize("dtype,transposed", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16"])
def test_compiled_equals_eager_without_graph_breaks(dtype, transposed):
    p = _problem(transposed)
    fn = _fn(p)
    inputs = [p[n].to(dtype) for n in ("x", "weight", "lora_a", "lora_b", "bias")]
    explained = torch._dynamo.explain(fn)(*inputs)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    targets = {str(n.target) for g in explained.graphs for n in g.graph.nodes}
    assert any("expert_linear_fwd" in t for t in targets), targets  # the operator, not the eager form
    torch._dynamo.reset()

    def run(f):
        leaves = [t.clone().requires_grad_(i != 1 or dtype == torch.float32) for i, t in enumerate(inputs)]
        y = f(*leaves)
        y.backward(p["dy"].to(dtype))
        return [y.detach()] + [t.grad for t in leaves]
    eager, compiled = run(fn), run(torch.compile(fn, backend="aot_eager", fullgraph=True))
    for a, b in zip(eager, compiled):
        assert (a is None) == (b is None)
        assert a is None or (a.dtype == b.dtype and torch.equal(a, b))


def test_operators_pass_opcheck(monkeypatch):
    """Schema, fake functions and autograd registration of both operators on real calls' arguments."""
    calls = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "corept_kernels":
                calls.append((func, args))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # dispatch answers the operator form
    with Record():
        _run(expert_linear, _problem(False), torch.float32, True)
    monkeypatch.undo()
    assert {str(op) for op, _ in calls} == {"corept_kernels.expert_linear_fwd.default",
                                            "corept_kernels.expert_linear_bwd.default"}
    for op, args in calls:
        if "bwd" in op.name():  # not differentiated again (no double backward)
            args = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, args)
        torch.library.opcheck(op, args)
