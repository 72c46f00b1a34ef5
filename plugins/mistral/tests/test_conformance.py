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
    known_failures = {"test_packed_documents_train_like_separate_bf16[sliding]": (
        "layer 0's gate_proj lora_B gradient: patched bf16 error 2.7e-2 against the bound 2.3e-2 (2 x HF's "
        "own 0.95e-2 + one ulp); every other tensor passes, fp32 matches tightly, and the same packed run "
        "with transformers' attention instead of corept's varlen kernel gives 2.2e-2: the kernel rounds once "
        "where transformers' attention rounds after each op (docs/conformance.md, rounding points)")}
