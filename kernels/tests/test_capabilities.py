"""``capabilities.dispatch``: the one rule every kernel function uses to pick Triton or its twin.

Each cause of a twin is checked with its reason; ``reference_only()`` forces twins (nested, across
exceptions, per thread); and every public kernel function, and every inner piece that chooses per
call, runs exactly what ``dispatch`` answered for its registered name.
"""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import corept_kernels
from corept_kernels import capabilities, norms
from corept_kernels.capabilities import dispatch, reference_only
from corept_kernels.attention import varlen_attention
from corept_kernels.lora import LoraWeights
from corept_kernels.lora import activation as lora_activation
from corept_kernels.lora import branch as lb


def _rms_args(H=12, dtype=torch.float32, device="cpu"):
    return torch.randn(3, H, dtype=dtype, device=device), torch.randn(H, dtype=dtype, device=device)


def _rope_args(cos_grad=False):
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos, sin = torch.randn(3, 8).requires_grad_(cos_grad), torch.randn(3, 8)
    return q, k, cos, sin


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA (there may be no GPU here)."""

    @property
    def is_cuda(self):
        return True


def _on_cuda(t):
    return torch.Tensor._make_subclass(_OnCuda, t)


def test_dispatch_answers_triton_when_it_can():
    fn, reason = dispatch("rms_norm", *_rms_args())
    assert fn is capabilities.get("rms_norm").triton_fn and reason == ""


CAUSES = {
    "no-interpreter": ("rms_norm", _rms_args, "CPU tensors need TRITON_INTERPRET=1"),
    "built-without-interpreter": ("rms_norm", _rms_args, "kernels were built without the interpreter"),
    "other-device": ("rms_norm", lambda: _rms_args(device="meta"), "does not run on meta"),
    "mixed-devices": ("rms_norm", lambda: (_rms_args()[0], _on_cuda(_rms_args()[1])), "both on and off CUDA"),
    "torch.compile": ("rms_norm", _rms_args, "not torch.compile-safe"),
    "row-too-wide": ("rms_norm", lambda: _rms_args(H=17), "row width 17 > MAX_H=16"),
    "dtype": ("rms_norm", lambda: _rms_args(dtype=torch.float64), "dtype torch.float64"),
    "empty": ("swiglu", lambda: (torch.randn(0, 5), torch.randn(0, 5)), "empty tensor"),
    "cos-needs-grad": ("rope", lambda: _rope_args(cos_grad=True), "cos/sin require grad"),
    "no-backward": ("lora_glu", lambda: (torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)), "no backward"),
}


@pytest.mark.parametrize("cause", list(CAUSES))
def test_dispatch_answers_the_twin_with_its_reason(cause, monkeypatch):
    name, make_args, expected = CAUSES[cause]
    if cause == "no-interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    if cause == "built-without-interpreter":
        monkeypatch.setattr(capabilities, "_BUILT_FOR_INTERPRETER", False)
    if cause == "torch.compile":  # a kernel without a custom-operator form (every shipped one has one)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        monkeypatch.setitem(capabilities._REGISTRY, name,
                            dataclasses.replace(capabilities.get(name), compiled_fn=None))
    if cause == "row-too-wide":
        monkeypatch.setattr(norms, "MAX_H", 16)
    fn, reason = dispatch(name, *make_args())
    assert fn is capabilities.get(name).reference_fn
    assert reason.startswith(f"{name}: ") and expected in reason, reason
    assert "\n" not in reason


def test_dispatch_answers_the_operator_form_while_compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    fn, reason = dispatch("rms_norm", *_rms_args())
    assert fn is capabilities.get("rms_norm").compiled_fn and reason == ""


def test_reference_only_forces_twins_nests_and_survives_exceptions():
    args = _rms_args()
    triton_fn, twin = capabilities.get("rms_norm").triton_fn, capabilities.get("rms_norm").reference_fn
    with reference_only():
        assert dispatch("rms_norm", *args) == (twin, "reference_only() is active")
        with reference_only():
            assert dispatch("rms_norm", *args)[0] is twin
        assert dispatch("rms_norm", *args)[0] is twin  # the inner exit kept the outer block
        with pytest.raises(RuntimeError, match="boom"):
            with reference_only():
                raise RuntimeError("boom")
        assert dispatch("rms_norm", *args)[0] is twin
    assert dispatch("rms_norm", *args) == (triton_fn, "")
    with pytest.raises(RuntimeError, match="boom"):
        with reference_only():
            raise RuntimeError("boom")
    assert dispatch("rms_norm", *args) == (triton_fn, "")
    assert corept_kernels.reference_only is reference_only


def test_reference_only_is_local_to_its_thread():
    args = _rms_args()
    entered, checked, seen = threading.Event(), threading.Event(), []

    def other():
        entered.wait()
        seen.append(dispatch("rms_norm", *args)[1])
        checked.set()

    t = threading.Thread(target=other)
    t.start()
    with reference_only():
        entered.set()
        checked.wait()
        assert dispatch("rms_norm", *args)[1] == "reference_only() is active"
    t.join()
    assert seen == [""]


def test_can_run_describes_the_device(monkeypatch):
    assert capabilities.can_run("rms_norm", "cpu") == (True, "")
    with reference_only():  # can_run describes the device (report labels); dispatch honours reference_only
        assert capabilities.can_run("rms_norm", "cpu") == (True, "")
    assert capabilities.can_run("rms_norm", "cpu", under_compile=True) == (True, "")
    assert capabilities.can_run("lora_glu", "cpu") == (False, "lora_glu: Triton kernel has no backward")
    assert capabilities.can_run("lora_glu", "cpu", needs_backward=False) == (True, "")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = capabilities.can_run("rms_norm", "cpu")
    assert not ok and "TRITON_INTERPRET=1" in reason
    # the LoRA paths are torch code around Triton pieces that dispatch on their own: any CPU
    assert capabilities.can_run("lora_mlp", "cpu") == (True, "")
    assert capabilities.can_run("rms_norm", "cuda") == (True, "")
    with pytest.raises(ValueError, match="at least one tensor"):
        dispatch("rms_norm", None)


# ----------------------------------------------------------------------------- every caller


def _lw(out_f, in_f, r=2):
    return LoraWeights(torch.randn(out_f, in_f), torch.randn(r, in_f).requires_grad_(),
                       torch.randn(out_f, r).requires_grad_(), 0.5)


def _calls():
    """(kernel name, a call of the public function or inner piece that dispatches on it)."""
    from corept_kernels import (cross_entropy, fused_linear_cross_entropy, geglu, layer_norm, lora_mlp, lora_o,
                                lora_qkv, rms_norm, rope, swiglu)

    x = torch.randn(2, 3, 8, requires_grad=True)
    bf = torch.randn(5, 7).bfloat16()
    return {
        "rms_norm": lambda: rms_norm(x, torch.randn(8), 1e-6),
        "layer_norm": lambda: layer_norm(x, torch.randn(8), torch.randn(8), 1e-5),
        "rope": lambda: rope(*_rope_args()),
        "swiglu": lambda: swiglu(x, torch.randn(2, 3, 8)),
        "geglu": lambda: geglu(x, torch.randn(2, 3, 8), "none"),
        "cross_entropy": lambda: cross_entropy(torch.randn(6, 11), torch.randint(0, 11, (6,))),
        "fused_linear_cross_entropy": lambda: fused_linear_cross_entropy(x, torch.randn(11, 8),
                                                                         torch.randint(0, 11, (2, 3))),
        "lora_mlp": lambda: lora_mlp(x, _lw(6, 8), _lw(6, 8), _lw(8, 6)),
        "lora_qkv": lambda: lora_qkv(x, _lw(8, 8), _lw(4, 8), _lw(4, 8)),
        "lora_o": lambda: lora_o(x, _lw(5, 8)),
        "lora_glu": lambda: lora_activation.glu_forward(torch.randn(5, 7), torch.randn(5, 7), "swiglu"),
        "lora_glu_backward": lambda: lora_activation.glu_backward_(*torch.randn(3, 5, 7).unbind(0), "geglu_tanh"),
        "rank_add": lambda: lb.rank_add_(bf.clone(), torch.randn(5, 2), torch.randn(2, 7), 1.0, False),
        "varlen_attention": lambda: varlen_attention(x.view(6, 1, 8), torch.randn(6, 1, 8), torch.randn(6, 1, 8),
                                                     torch.tensor([0, 2, 6], dtype=torch.int32), 4, scale=0.5),
        "expert_linear": lambda: corept_kernels.expert_linear(x.view(6, 8), torch.tensor([2, 6], dtype=torch.int32),
                                                              torch.randn(2, 5, 8)),
        "rank_add (group)": lambda: lb.add_branches_([bf.clone(), bf.clone()], [torch.randn(5, 2)] * 2,
                                                     [torch.randn(7, 2)] * 2, [1.0, 0.5], False),
    }


def _spy_on(monkeypatch, name: str, ran: list) -> None:
    """Replace kernel ``name``'s registered functions by wrappers that record which one ran."""
    info = capabilities.get(name)

    def spy(kind, fn):
        def run(*args, **kwargs):
            ran.append(kind)
            return fn(*args, **kwargs)
        return run

    monkeypatch.setitem(capabilities._REGISTRY, name, dataclasses.replace(
        info, triton_fn=spy("triton", info.triton_fn), reference_fn=spy("twin", info.reference_fn)))


def test_every_registered_kernel_has_a_caller_here():
    assert {n.split(" ")[0] for n in _calls()} == set(capabilities.all_kernels())


@pytest.mark.parametrize("forced", [False, True], ids=["dispatched", "reference_only"])
@pytest.mark.parametrize("call", list(_calls()))
def test_every_kernel_function_runs_what_dispatch_answers(call, forced, monkeypatch):
    """Under the interpreter each function runs its registered Triton path; under
    ``reference_only()`` its registered twin, and nothing else."""
    ran = []
    _spy_on(monkeypatch, call.split(" ")[0], ran)
    fn = _calls()[call]
    if forced:
        with reference_only():
            fn()
    else:
        fn()
    assert ran == ["twin" if forced else "triton"], ran
