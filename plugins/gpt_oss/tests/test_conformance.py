"""Conformance of the gpt_oss plugin: the corept.testing matrix on a tiny gpt-oss config.

* 4 local experts, top-2 routing (the router's bias gets the kit's noise), intermediate 32.
* ``layer_types`` sliding then full, sliding window 4 < sequence 8: the window masks real positions
  in layer 0 only (``quirk_probes`` proves it changes the logits).
* Attention sinks (``sinks``, 1-D: the kit's noise moves them off transformers' init), attention
  biases on q/k/v/o, YaRN rope (``original_max_position_embeddings`` 16 x factor 32 = the tiny
  512 positions, so transformers does not warn).
* ``moe`` (the full matrix, GRPO, packing, compile) keeps gpt-oss's real ``swiglu_limit`` 7.0,
  which the tiny model's gate/up values (~0.1-0.3) never reach. ``clamp`` (the reduced matrix: fp32,
  bf16, fp32 LoRA) sets it to 0.4, so the clamp bites on some of them (``quirk_probes``: back to 7.0
  changes the logits). Not lower: the clamp's derivative jumps at the limit, and the more values sit
  near it, the likelier a bf16 rounding puts one on the other side in one model and not the other,
  an O(1) gradient difference that says nothing about rounding quality (at 0.2, a quarter of the
  values clamped, the bf16 experts gradients failed the rule by 3-10x while fp32 matched to 1e-7).

Patched: norms (``scale_in_fp32``), attention (the varlen kernel with sinks, sliding and full
layers), the fused loss and the experts (grouped GEMMs, LoRA on them included). Kept (declared,
each with its reason): rope and the router block, so ``patch(only=[c])`` for those must be bitwise
transformers'.

The packing checks pass on corept's attention, which splits a packed row into its documents.
transformers' own ``GptOssModel.forward`` builds its masks without ``position_ids`` (5.24 and 5.25;
upstream PR huggingface/transformers#39997), so unpatched, a padding-free row attends across its
documents (0.61 of max|logit| off its documents run alone on this config).
"""
from corept.testing import ConformanceSuite, tiny_config

SLIDING = ["sliding_attention", "full_attention"]
YARN = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=16,
            truncate=False, rope_theta=150000.0)


def _moe(limit: float):
    return tiny_config("gpt_oss", num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                       layer_types=SLIDING, sliding_window=4, rope_parameters=dict(YARN), swiglu_limit=limit)


class TestGptOss(ConformanceSuite):
    plugin = "gpt_oss"
    configs = {
        "moe": lambda: _moe(7.0),
        "clamp": lambda: _moe(0.4),
    }
    expected_quirks = {name: {"sliding_window": 4, "norm_casting": "scale_in_fp32", "norm_offset": 0.0}
                       for name in ("moe", "clamp")}
    quirk_probes = {"moe": {"sliding_window": 4096}, "clamp": {"swiglu_limit": 7.0}}
