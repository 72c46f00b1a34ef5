"""Every kernel inside ``torch.compile``: no graph break, compiled == eager, operators well formed.

A kernel's ``compile_safe`` is true when it declares a ``compiled_fn`` (its custom-operator form,
:mod:`corept_kernels.ops`). This file holds the proof for each: a call on odd shapes traced by
``torch._dynamo.explain`` shows no graph break, and ``torch.compile(backend="aot_eager",
fullgraph=True)`` gives outputs and gradients equal to eager (both run the same launches, so they
must be bitwise equal). ``aot_eager`` runs Dynamo and AOTAutograd, the parts that trace, without
code generation, so this runs on CPU through the Triton interpreter. ``torch.library.opcheck``
checks each operator's schema, fake function and autograd registration against real calls.
:data:`CASES` must name every registered kernel: a new kernel without a case fails here.
The fused LoRA paths are proven on peft models in ``lora/test_compile_lora.py``.
"""
from __future__ import annotations

import pytest
import torch

import corept_kernels as ck
from corept_kernels.attention import varlen_attention
from corept_kernels.capabilities import all_kernels
from corept_kernels.lora.activation import glu_backward_, glu_forward
from corept_kernels.lora.branch import rank_add_

#: On a GPU machine (TRITON_INTERPRET=0) the same cases run on CUDA, the operators' real path
#: (bench/run_e2e_h200.sh compile runs them there); on CPU through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() and not ck.interpreter_active() else "cpu"


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):
        yield


def _rope(dt):
    q, k = torch.randn(2, 5, 7, 12, dtype=dt), torch.randn(2, 1, 7, 12, dtype=dt)
    cos, sin = torch.randn(2, 7, 10, dtype=dt), torch.randn(2, 7, 10, dtype=dt)
    return (lambda q, k: ck.rope(q, k, cos, sin)), (q, k)


def _flce(dt, **kw):
    h, w = torch.randn(2, 9, 24, dtype=dt), torch.randn(37, 24, dtype=dt)
    y = torch.randint(0, 37, (2, 9))
    y[0, :3] = -100
    return (lambda h, w: ck.fused_linear_cross_entropy(h, w, y, chunk_size=5, **kw)), (h, w)


def _ce(dt, **kw):
    x, y = torch.randn(3, 7, 37, dtype=dt), torch.randint(0, 37, (3, 7))
    y[1, 2] = -100
    return (lambda x: ck.cross_entropy(x, y, **kw)), (x,)


def _varlen_attention(dt):
    cu = torch.tensor([0, 3, 4, 13], dtype=torch.int32)
    q, k, v = torch.randn(13, 4, 24, dtype=dt), torch.randn(13, 2, 24, dtype=dt), torch.randn(13, 2, 24, dtype=dt)
    return (lambda q, k, v: varlen_attention(q, k, v, cu, 9, scale=0.2, window=5, softcap=20.0)), (q, k, v)


def _lora_pieces(dt):
    """The LoRA inner kernels (no autograd of their own), e and g the halves of one buffer."""
    def fn(buf, dh):
        buf, dh = buf.detach() * 1.0, dh.detach() * 1.0  # not differentiable: no graph to guard
        e, g = buf[:, :13], buf[:, 13:]
        h = glu_forward(e, g, "geglu_tanh")
        glu_backward_(dh, e, g, "geglu_tanh")
        y = (buf[:, :13] * 0.5).contiguous()
        rank_add_(y, torch.ones(5, 3), torch.full((3, 13), 0.25), 2.0, True)
        return h, dh, buf, y
    return fn, (torch.randn(5, 26, dtype=dt), torch.randn(5, 13, dtype=dt))


CASES = {
    "rms_norm": lambda dt: ((lambda x, w: ck.rms_norm(x, w, 1e-6, offset=1.0)), (torch.randn(3, 5, 37, dtype=dt),
                                                                                torch.randn(37, dtype=dt))),
    "layer_norm": lambda dt: ((lambda x, w, b: ck.layer_norm(x, w, b, 1e-5)),
                              (torch.randn(4, 37, dtype=dt), torch.randn(37, dtype=dt), torch.randn(37, dtype=dt))),
    "rope": _rope,
    "swiglu": lambda dt: (ck.swiglu, (torch.randn(3, 29, dtype=dt), torch.randn(3, 29, dtype=dt))),
    "geglu": lambda dt: ((lambda g, u: ck.geglu(g, u, "none")), (torch.randn(3, 29, dtype=dt),
                                                                 torch.randn(3, 29, dtype=dt))),
    "cross_entropy": lambda dt: _ce(dt, softcap=30.0, label_smoothing=0.1, z_loss=1e-4),
    "fused_linear_cross_entropy": lambda dt: _flce(dt, softcap=20.0),
    "varlen_attention": _varlen_attention,
    "lora_glu": _lora_pieces, "lora_glu_backward": _lora_pieces, "rank_add": _lora_pieces,
    "lora_mlp": None, "lora_qkv": None, "lora_o": None,  # lora/test_compile_lora.py
    "expert_linear": None,  # test_grouped_gemm.py
}

EXTRA = {  # further options of the kernels with several paths inside their operators
    "cross_entropy-none": lambda dt: _ce(dt, reduction="none", logit_scale=0.5),
    "cross_entropy-num_items": lambda dt: _ce(dt, reduction="mean", num_items_in_batch=11),
    "fused_linear_cross_entropy-logprobs": lambda dt: _flce(dt, return_logprobs=True),
    "fused_linear_cross_entropy-none": lambda dt: _flce(dt, reduction="none", label_smoothing=0.1),
}


def test_every_kernel_has_a_case_and_is_compile_safe():
    kernels = all_kernels()
    assert set(kernels) == set(CASES)
    assert [n for n, info in kernels.items() if not info.compile_safe] == []


def _outputs(result):
    return [t for t in (result if isinstance(result, (tuple, list)) else (result,)) if isinstance(t, torch.Tensor)]


def _run(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = _outputs(fn(*leaves))
    diff = [o for o in outs if o.requires_grad]
    if diff:
        loss = sum((o.float() * torch.linspace(0.5, 1.5, o.numel()).view(o.shape)).sum() for o in diff)
        loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves if t.grad is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c is not None and n not in ("lora_glu_backward",
                                                                                             "rank_add")]
                         + list(EXTRA))
def test_compiled_equals_eager_without_graph_breaks(name, dtype):
    fn, inputs = {**CASES, **EXTRA}[name](dtype)
    explained = torch._dynamo.explain(fn)(*inputs)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    torch._dynamo.reset()
    eager = _run(fn, inputs)
    compiled = _run(torch.compile(fn, backend="aot_eager", fullgraph=True), inputs)
    assert len(eager) == len(compiled) and len(eager) > len(_outputs(fn(*inputs)))  or name.startswith("lora")
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "rope", "swiglu", "cross_entropy",
                                  "fused_linear_cross_entropy", "lora_glu", "varlen_attention"])
def test_operators_pass_opcheck(name, monkeypatch):
    """Schema, fake function and autograd registration of every operator the kernel calls, on
    the arguments of a real call (recorded while the compiled forms run eagerly)."""
    calls = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "corept_kernels":
                calls.append((func, args))
            return func(*args, **(kwargs or {}))

    fn, inputs = CASES[name](torch.float32)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # dispatch answers compiled_fn
    with Record():
        _run(fn, inputs)
    monkeypatch.undo()
    assert calls, "no corept_kernels operator ran"
    for op, args in {str(op): (op, args) for op, args in calls}.values():
        if "bwd" in op.name():  # backward operators are not differentiated again (no double backward)
            args = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, args)
        torch.library.opcheck(op, args)
