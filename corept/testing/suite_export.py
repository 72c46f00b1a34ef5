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
        """f16 and q8_0 GGUF files read back (``gguf``'s dequantizers, names and layouts inverted
        through the plugin's declaration) to exactly the weights written: f16-rounded weights, or what
        corept's Q8_0 quantizer decodes to; the model on the read-back f16 weights gives the same
        logits within f16 rounding (max error <= 1% of the largest logit)."""
        pytest.importorskip("gguf", reason="GGUF export needs the gguf package")
        from corept.export.gguf.names import from_file, to_file
        from corept.export.gguf.quants import quantize_q8_0
        from corept.export.gguf.readback import read_back
        from corept.export.gguf.writer import prepare

        arch = corept_store.arch(config_name)
        if arch is None or arch.declaration.gguf is None:
            pytest.skip(f"{config_name}: the architecture declares no GGUF export")
        base = copy.deepcopy(corept_store.base(config_name)).float()
        plans = {p.hf: p for p in prepare(base, None, "f16").plans}
        weights = base.state_dict()
        stored = {"F32": lambda t: t, "F16": lambda t: t.half().float(),
                  "Q8_0": lambda t: quantize_q8_0(t.reshape(t.shape[0], -1))[1].reshape(t.shape)}
        for mix in ("f16", "q8_0"):
            path = corept.save(base, None, tmp_path / mix, method="gguf", quantization=mix)
            state, types = read_back(path, base)
            assert set(state) == set(plans), f"{mix}: read back {sorted(set(state) ^ set(plans))} differently"
            for key, got in state.items():
                plan = plans[key]
                expected = from_file(plan, stored[types[key]](to_file(plan, weights[key].float())))
                assert same(got, expected), f"{mix} {key} ({types[key]}): read back differs from what was written"
            if mix == "f16":
                reloaded = copy.deepcopy(base)
                reloaded.load_state_dict(state, strict=False)
                ids = corept_store.batch(config_name)["input_ids"]
                with torch.no_grad():
                    want, got = base(input_ids=ids).logits, reloaded(input_ids=ids).logits
                err = (got - want).abs().max().item()
                assert err <= 0.01 * want.abs().max().item(), f"f16 GGUF logits off by {err}"
