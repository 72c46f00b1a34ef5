"""transformers' hub kernelization (HF ``kernels`` installed) cannot silently remove corept's patches.

transformers 5.25 kernelizes models loaded by ``from_pretrained`` when the ``kernels`` package is
installed, and re-kernelizes on every ``train()``/``eval()``: each module with a hub-kernel layer
name gets its instance ``forward`` replaced or removed. The mechanism is driven by two instance
flags (``_use_kernels``, ``_kernels_mode``); this test sets them as kernelization does and checks
corept turns them off for the model it patches (recorded: ``unpatch`` turns them back on). The
same check against the real ``kernels`` package runs in ``make test-latest`` (transformers 5.25).
"""
from __future__ import annotations

import corept
from corept.testing import live
import tiny


def _kernelized(model):
    model.__dict__["_use_kernels"] = True
    model.__dict__["_kernels_mode"] = "training"
    return model


def test_patch_turns_kernelization_off_and_unpatch_restores_it(caplog):
    model = _kernelized(tiny.tiny_model("llama"))
    with caplog.at_level("INFO", logger="corept"):
        corept.patch(model)
    assert model.__dict__["_use_kernels"] is False and model.__dict__["_kernels_mode"] is None
    assert "hub kernelization" in caplog.text
    assert corept.report(model).settings["hub_kernels"].startswith("turned off")
    for step in (model.train, model.eval, model.train):
        step()
        live.check_report(model)
        assert corept.report(model).applied["norm"] == "triton:rms_norm x5"
    corept.unpatch(model)
    assert model.__dict__["_use_kernels"] is True and model.__dict__["_kernels_mode"] == "training"


def test_a_forward_replaced_after_patching_is_reported_not_claimed():
    """Anything that replaces a patched forward later (a kernelization corept did not see, a user)
    shows in the report as a fallback naming what runs now."""
    model = corept.patch(tiny.tiny_model("llama"))
    norm = model.model.norm
    del norm.forward  # what kernelize does when it falls back to the class's forward
    rep = corept.report(model)
    assert rep.applied["norm"] == "triton:rms_norm x4"
    assert "replaced after corept patched LlamaRMSNorm (now the class's forward)" in rep.fallbacks["norm"]
    live.check_report(model)
