"""The conformance kit on a tiny Granite: ``tiny_config`` moves all four multipliers off 1.0
(``logits_scaling`` 2.5, so the fused loss must divide by it)."""
from corept.testing import ConformanceSuite, tiny_config


class TestGranite(ConformanceSuite):
    plugin = "granite"
    configs = {"gqa": lambda: tiny_config("granite")}
    expected_quirks = {"gqa": {"logit_scale": 0.4}}
