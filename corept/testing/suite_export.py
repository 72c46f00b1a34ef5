"""The export checks of the conformance suite: every architecture that declares a
:class:`~corept.GGUFExport` round-trips through a GGUF file."""
from __future__ import annotations

import copy

import pytest
import torch

import corept
from corept.testing.store import same


class ExportChecks:
    """Mixed into :class:`~corept.testing.ConformanceSuite`."""

    def test_gguf_round_trip(self, corept_store, config_name, tmp_path):
        """f16, bf16 and q8_0 GGUF files read back (``gguf``'s dequantizers, names and layouts
        inverted through the plugin's declaration) to exactly the weights written: the f16 / bf16
        rounded weights, or the weights as the ``gguf`` package's own (ggml's reference) Q8_0
        quantizer stores them, bit for bit. The model on the read-back f16 and bf16 weights
        (computing in fp32) is off the fp32 model's logits by no more than twice what the model run in
        bf16 is off them (the project's bf16 rule); the q8_0 model's logits are those of the
        reference quantization, since its weights are."""
        import gguf

        from corept.export.gguf.names import from_file, to_file
        from corept.export.gguf.readback import read_back
        from corept.export.gguf.writer import prepare

        arch = corept_store.arch(config_name)
        if arch is None or arch.declaration.gguf is None:
            pytest.skip(f"{config_name}: the architecture declares no GGUF export")
        base = copy.deepcopy(corept_store.base(config_name)).float()
        plans = {p.hf: p for p in prepare(base, None, "f16").plans}
        weights = base.state_dict()
        stored = {"F32": lambda t: t, "F16": lambda t: t.half().float(), "BF16": lambda t: t.bfloat16().float(),
                  "Q8_0": lambda t: torch.from_numpy(_reference_q8_0(gguf, t.numpy())).reshape(t.shape)}
        ids = corept_store.batch(config_name)["input_ids"]
        with torch.no_grad():
            want = base(input_ids=ids).logits
            bf16_err = (copy.deepcopy(base).to(torch.bfloat16)(input_ids=ids).logits.float() - want).abs().max().item()
        for mix in ("f16", "bf16", "q8_0"):
            path = corept.save(base, None, tmp_path / mix, method="gguf", quantization=mix)
            state, types = read_back(path, base)
            assert set(state) == set(plans), f"{mix}: read back {sorted(set(state) ^ set(plans))} differently"
            for key, got in state.items():
                plan = plans[key]
                expected = from_file(plan, stored[types[key]](to_file(plan, weights[key].float())))
                assert same(got, expected), f"{mix} {key} ({types[key]}): read back differs from what was written"
            if mix == "q8_0":
                continue
            reloaded = copy.deepcopy(base)
            reloaded.load_state_dict(state, strict=False)
            with torch.no_grad():
                err = (reloaded(input_ids=ids).logits - want).abs().max().item()
            assert err <= 2 * bf16_err, f"{mix} GGUF logits off by {err:.3g}; the model in bf16 by {bf16_err:.3g}"


def _reference_q8_0(gguf, w):
    """``w`` (2-D float32, GGUF layout) quantized and decoded by the ``gguf`` package's Q8_0."""
    q = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.dequantize(gguf.quants.quantize(w, q), q)
