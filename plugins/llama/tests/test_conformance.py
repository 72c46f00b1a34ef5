"""Conformance of the llama plugin: the corept.testing matrix on tiny Llama configs.

* ``llama3``: GQA 4/2, head_dim 24 != 64/4, vocab 257, Llama 3.1 rope scaling (``rope_type``
  ``llama3`` with ``original_max_position_embeddings`` small enough that the scaling moves the
  low frequencies), untied embeddings. Full matrix and the convergence check.
* ``tied_bias``: tied input/output embeddings, bias on q/k/v/o and on the MLP projections
  (the fused LoRA paths fall back to peft for biased layers, with a reason).

The activation is read from the config (``hidden_act="silu"``: SwiGLU).
"""
from corept.testing import ConformanceSuite, tiny_config

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


class TestLlama(ConformanceSuite):
    plugin = "llama"
    configs = {
        "llama3": lambda: tiny_config("llama", rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=False),
        "tied_bias": lambda: tiny_config("llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    }
    expected_quirks = {"llama3": {"mlp_activation": "swiglu", "norm_casting": "scale_after_cast"}}
    quirk_probes = {
        "llama3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        "tied_bias": {"tie_word_embeddings": False},
    }
