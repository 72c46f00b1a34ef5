"""Conformance of the qwen plugin: the corept.testing matrix on tiny Qwen2/Qwen3/Qwen3-MoE configs.

* ``qwen3``: per-head ``q_norm``/``k_norm`` before RoPE (patched as norms). Full matrix.
* ``qwen2``: bias on q/k/v (given random values by the kit, since transformers initialises biases
  to zero); the fused LoRA path keeps peft's forward for the biased projections (reported).
* ``qwen3_moe``: 4 experts, top-2 routing; norms, RoPE, loss and the experts (grouped GEMMs) patched,
  LoRA on the stacked experts too; the router block stays transformers' (the plugin keeps ``mlp``:
  ``patch(only=["mlp"])`` must be bitwise HF). Full matrix and the compiled-layers check as well.
"""
from corept.testing import ConformanceSuite, tiny_config


class TestQwen(ConformanceSuite):
    plugin = "qwen"
    full_matrix = ("qwen3", "qwen3_moe")
    compiled = ("qwen3", "qwen3_moe")
    configs = {
        "qwen3": lambda: tiny_config("qwen3"),
        "qwen2": lambda: tiny_config("qwen2"),
        "qwen3_moe": lambda: tiny_config("qwen3_moe", num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
    }
    expected_quirks = {"qwen3": {"mlp_activation": "swiglu"}, "qwen2": {"sliding_window": None}}
