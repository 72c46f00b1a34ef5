"""The real thing: transformers 5.25+ with HF's ``kernels`` installed (``make test-latest``).

Without corept, a model loaded by ``from_pretrained`` is kernelized and ``train()`` resets the
instance forwards of its hub-kernel layers (the control below shows it). corept's patches must
survive ``train()``/``eval()`` both when corept loads the model and when it patches a model the
user loaded, and the report must say what runs.
"""
from __future__ import annotations

import importlib.util

import pytest
from transformers import AutoModelForCausalLM

import corept
from corept.testing import live
import tiny

pytestmark = pytest.mark.skipif(importlib.util.find_spec("kernels") is None,
                                reason="needs HF's `kernels` package (make test-latest installs it with transformers 5.25)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.save_tiny(tmp_path_factory.mktemp("hub-kernels"), "llama")


def test_the_trap_is_real(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.use_kernels, "transformers did not kernelize the model: this test checks nothing"
    model.model.norm.forward = lambda x: x  # an instance forward, as a patch sets
    model.train()
    assert "forward" not in model.model.norm.__dict__  # re-kernelization removed it


def test_patched_user_loaded_model_survives_train_and_eval(folder):
    model = corept.patch(AutoModelForCausalLM.from_pretrained(folder))
    assert not model.use_kernels and corept.report(model).settings["hub_kernels"].startswith("turned off")
    for step in (model.train, model.eval, model.train):
        step()
        live.check_report(model)
        assert corept.report(model).applied["norm"] == "triton:rms_norm x5"
    corept.unpatch(model)
    assert model.use_kernels  # restored


def test_corept_load_does_not_kernelize(folder):
    model, _ = corept.load(str(folder), dtype="fp32")
    assert not model.use_kernels
    peft_model = corept.get_peft_model(model, r=4)
    for step in (peft_model.train, peft_model.eval):
        step()
        live.check_report(peft_model)
    assert corept.report(peft_model).applied["norm"] == "triton:rms_norm x5"
