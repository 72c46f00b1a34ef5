"""Conformance of the mistral plugin: the corept.testing matrix on tiny Mistral/Ministral configs.

Both force a sliding window (4) shorter than the test sequences (8), so the window masks real
positions in the forward, the loss, the gradients and cached generation; the probe proves it.
``ministral`` (alternating layer types in its config) runs when transformers has it.
"""
import importlib.util

from corept.testing import ConformanceSuite, tiny_config

HAS_MINISTRAL = importlib.util.find_spec("transformers.models.ministral") is not None

CONFIGS = {"sliding": lambda: tiny_config("mistral", sliding_window=4)}
if HAS_MINISTRAL:
    CONFIGS["ministral"] = lambda: tiny_config("ministral", sliding_window=4,
                                               layer_types=["sliding_attention", "full_attention"])


class TestMistral(ConformanceSuite):
    plugin = "mistral"
    configs = CONFIGS
    expected_quirks = {"sliding": {"sliding_window": 4}, "ministral": {"sliding_window": 4}}
    quirk_probes = {"sliding": {"sliding_window": 4096}, "ministral": {"sliding_window": 4096}}
