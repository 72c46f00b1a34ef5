"""The conformance kit itself: its tolerances fail when they should, its matrix is what the docs
say, its interpreter rounding equals torch's, and a deliberately broken plugin fails the suite."""
import dataclasses

import numpy as np
import pytest
import torch

import corept
from corept import hookimpl
from corept.components.norm import norm_replacement
from corept.testing import BF16_FLOOR, ConformanceSuite, assert_bf16_within, assert_fp32_close, tiny_config
from corept.testing.cases import PATCH_SETS, MatrixCase, full_cases, quirk_cases
from corept.testing.interpreter import nearest_bf16_rounding, round_nearest_even_bf16
from corept.testing.store import Store


class _Suite(ConformanceSuite):  # not collected (no Test prefix): driven by hand below
    plugin = "llama"
    configs = {"gqa": lambda: tiny_config("llama")}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(_Suite, tmp_path_factory)


def test_fp32_tolerance_catches_a_small_error():
    e = torch.randn(64, 64)
    assert_fp32_close("same", e + 1e-7 * e.abs().max(), e)
    with pytest.raises(AssertionError, match="fp32 mismatch"):
        assert_fp32_close("off", e * (1 + 1e-3), e)
    with pytest.raises(AssertionError):
        assert_fp32_close("nan", torch.where(e > 2, float("nan"), e), e)


def test_bf16_rule_is_relative_to_the_unpatched_error():
    gold = torch.randn(1000)
    ref = gold.bfloat16()
    assert_bf16_within("as good", ref, ref, gold)
    bad = (gold * (1 + 8 * BF16_FLOOR)).bfloat16()
    with pytest.raises(AssertionError, match="patched bf16 error"):
        assert_bf16_within("8 ulps off", bad, ref, gold)


def test_matrix_matches_the_documented_pruning():
    cases = full_cases("c")
    assert len(cases) == 19 and len({c.id for c in cases}) == 19
    assert {c.patch for c in cases if not c.lora and not c.ckpt} == set(PATCH_SETS) - {"experts"}
    moe = full_cases("m", experts=True)  # an architecture that declares experts: experts alone too
    assert len(moe) == 21 and {c.patch for c in moe if not c.lora and not c.ckpt} == set(PATCH_SETS)
    assert all(c.lora for c in cases if c.quant == "4bit")  # 4-bit only with LoRA
    assert {(c.dtype, c.ckpt) for c in cases if c.quant == "4bit"} == {("fp32", False), ("fp32", True), ("bf16", False)}
    assert [c.id for c in quirk_cases("q")] == ["q-fp32-all", "q-bf16-all", "q-fp32-all-lora"]


def test_interpreter_rounding_equals_torch_and_is_restored():
    from triton.runtime import interpreter

    values = np.concatenate([np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100,
                             np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, 1e-40, 1.00390625, 1.01171875],
                                      dtype=np.float32)])
    want = torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(round_nearest_even_bf16(values), want)
    nan = round_nearest_even_bf16(np.array([np.nan], dtype=np.float32))
    assert np.isnan(torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).float().numpy()).all()
    original = interpreter.InterpreterBuilder.cast_impl
    with nearest_bf16_rounding() as adjusted:
        assert adjusted and interpreter.InterpreterBuilder.cast_impl is not original
    assert interpreter.InterpreterBuilder.cast_impl is original


def _probing() -> bool:
    """A patch-time probe is running (corept_kernels.reference_only() is active)."""
    from corept_kernels import dispatch

    return dispatch("rms_norm", torch.ones(1, 4), torch.ones(4))[1] == "reference_only() is active"


class _WrongNorm:
    """A plugin answering llama's norm hook first with a replacement whose math is right (its probe
    passes) but whose kernel path is subtly wrong: a 1e-3 relative error, or (``fp8_output``) the
    result stored through an fp8 buffer, a precision bug only the bf16 rule can see in a bf16 run."""

    def __init__(self, fp8_output=False, scale=1.0):
        self.fp8_output, self.scale = fp8_output, scale

    @hookimpl(tryfirst=True)
    def corept_patch_norm(self, arch, module, model):
        r = norm_replacement(arch, module, model)
        right, bug = r.forward, self

        def forward(mod, x):
            y = right(mod, x)
            if _probing():
                return y
            return y.to(torch.float8_e4m3fn).to(y.dtype) if bug.fp8_output else y * bug.scale

        return dataclasses.replace(r, forward=forward)


class _WrongMath:
    """A plugin declaring the wrong norm offset for llama: the probe refuses the replacement, and the
    report names the quirk to check."""

    @hookimpl(tryfirst=True)
    def corept_patch_norm(self, arch, module, model):
        wrong = dataclasses.replace(arch, numerics=dataclasses.replace(arch.numerics, norm_offset=1.0), probes={})
        return norm_replacement(wrong, module, model)


@pytest.mark.parametrize("dtype, bug", [("fp32", {"scale": 1 + 1e-3}), ("bf16", {"fp8_output": True})],
                         ids=["fp32-scale-1e-3", "bf16-fp8-store"])
def test_suite_fails_a_broken_plugin(store, dtype, bug):
    suite, case = _Suite(), MatrixCase("gqa", dtype, "norm")
    with nearest_bf16_rounding():  # what the suite's class fixture does under the interpreter
        suite.test_matrix(store, case)  # the real plugin passes
        corept.register_plugin(_WrongNorm(**bug), "wrong-norm")
        try:
            with pytest.raises(AssertionError, match="tensors differ"):
                suite.test_matrix(store, case)
        finally:
            corept.unregister_plugin("wrong-norm")


def test_probe_refuses_wrong_math_and_the_kit_names_the_quirk(store):
    corept.register_plugin(_WrongMath(), "wrong-math")
    try:
        with pytest.raises(AssertionError, match="norm_offset=1 and norm_casting"):
            _Suite().test_declaration_and_report(store, "gqa")
    finally:
        corept.unregister_plugin("wrong-math")
