"""The conformance kit on a tiny Granite: ``tiny_config`` moves all four multipliers off 1.0
(``logits_scaling`` 2.5, so the fused loss must divide by it). Without any one of the plugin's
declarations the kit fails, naming what is missing."""
import copy
import dataclasses

import pytest

import corept
from corept import Numerics, Recorded
from corept.registry.plugin_base import ArchitecturePlugin
from corept.testing import ConformanceSuite, tiny_config
from corept_granite import GRANITE


def _without(field: str):
    """GRANITE minus one declaration, claiming granite over the installed plugin."""
    if field == "logits_scaling":
        return dataclasses.replace(GRANITE, numerics=Numerics(), priority=1)
    kept = {k: v for k, v in GRANITE.recorded.config.items() if k != field}
    return dataclasses.replace(GRANITE, recorded=Recorded(config=kept), priority=1)


class TestGranite(ConformanceSuite):
    plugin = "granite"
    configs = {"gqa": lambda: tiny_config("granite")}
    full_matrix = ()  # its quirks are head math and multipliers: the quirk cases (fp32, bf16, LoRA) judge them
    expected_quirks = {"gqa": {"logit_scale": 0.4}}
    quirk_probes = {"gqa": {"logits_scaling": 1.0, "embedding_multiplier": 1.0, "residual_multiplier": 1.0,
                            "attention_multiplier": 1.0}}

    @pytest.mark.parametrize("field", ["logits_scaling", *GRANITE.recorded.config])
    def test_the_kit_fails_without_each_declaration(self, corept_store, field):
        corept.register_plugin(ArchitecturePlugin([_without(field)]), "granite-without")
        suite = copy.copy(self)
        suite.plugin, suite.expected_quirks = None, {}  # the variant (its own plugin, no logit scale) owns it
        try:
            check = suite.test_declaration_and_report if field == "logits_scaling" else suite.test_quirks_are_declared
            with pytest.raises(AssertionError) as failure:
                check(corept_store, "gqa")
        finally:
            corept.unregister_plugin("granite-without")
        hint = "declare its head-side math in Numerics" if field == "logits_scaling" else field
        assert hint in str(failure.value), failure.value
