"""The conformance kit on a tiny Phi-3, and its LoRA: every linear on a fused path. Without the
fused-projection declaration the kit fails, naming it."""
import copy
import dataclasses

import pytest

import corept
from corept import Projections
from corept.registry.plugin_base import ArchitecturePlugin
from corept.testing import ConformanceSuite, tiny_config
from corept_phi3 import PHI3


class TestPhi3(ConformanceSuite):
    plugin = "phi3"
    configs = {"gqa": lambda: tiny_config("phi3")}

    def test_lora_fuses_every_linear(self, corept_store):
        """LoRA lands on qkv_proj, o_proj, gate_up_proj and down_proj, and none keeps peft's path."""
        model = corept.get_peft_model(corept.patch(copy.deepcopy(corept_store.base("gqa"))), r=4,
                                      use_gradient_checkpointing=False)
        targets = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
        assert targets == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}, targets
        rep = corept.report(model)
        layers = model.config.num_hidden_layers
        assert rep.applied["lora"] == f"triton:lora_o x{2 * layers}, triton:lora_mlp x{layers}", rep.applied
        assert "lora" not in rep.fallbacks, rep.fallbacks

    def test_the_kit_fails_without_the_fused_projections(self, corept_store):
        plain = dataclasses.replace(PHI3, projections=Projections(), priority=1)
        corept.register_plugin(ArchitecturePlugin([plain]), "phi3-without")
        suite = copy.copy(self)
        suite.plugin = None  # the variant's own plugin owns the model now
        try:
            with pytest.raises(AssertionError, match="declare them with corept.Projections"):
                suite.test_declaration_and_report(corept_store, "gqa")
        finally:
            corept.unregister_plugin("phi3-without")
