"""Conformance of the gemma plugin: the corept.testing matrix on tiny Gemma 1/2/3 configs.

* ``gemma2`` (full matrix): weights of std 0.1, attention softcap 1.0 and final-logit softcap 0.5, so that
  ``tanh`` is far from linear on these logits; sliding window 4 < sequence 8 on alternate layers;
  pre/post feed-forward norms; eager attention (declared).
* ``gemma``: RMSNorm ``(1 + w)`` in fp32 (the kit randomises the zero-initialised norm weights),
  GeGLU tanh, embeddings scaled by sqrt(hidden) in the model dtype; tied embeddings.
* ``gemma3_text``: q/k norms, sliding + full layers, SDPA disabled by the quirk (eager forced).
* ``gemma3_mm``: the text path of the multimodal ``Gemma3ForConditionalGeneration`` with a tiny
  SigLIP tower (text-only batches); its own head keeps transformers' loss (declared).
"""
import transformers

from corept.testing import ConformanceSuite, tiny_config

SLIDING = ["sliding_attention", "full_attention"]
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, vocab_size=257, max_position_embeddings=512, sliding_window=4, layer_types=SLIDING,
            query_pre_attn_scalar=24)


def gemma3_multimodal():
    """A tiny Gemma3Config: the text model above and a 1-layer SigLIP tower (28x28 images, 4 tokens)."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=7)
    return transformers.Gemma3Config(text_config=dict(TEXT), vision_config=vision, mm_tokens_per_image=4)


class TestGemma(ConformanceSuite):
    plugin = "gemma"
    configs = {
        "gemma2": lambda: tiny_config("gemma2", sliding_window=4, layer_types=SLIDING, query_pre_attn_scalar=24,
                                      attn_logit_softcapping=1.0, final_logit_softcapping=0.5, initializer_range=0.1),
        "gemma": lambda: tiny_config("gemma"),
        "gemma3_text": lambda: tiny_config("gemma3_text", sliding_window=4, layer_types=SLIDING,
                                           query_pre_attn_scalar=24),
        "gemma3_mm": gemma3_multimodal,
    }
    model_classes = {"gemma3_mm": "Gemma3ForConditionalGeneration"}
    packed = ("gemma2", "gemma3_text")  # softcapping and sliding windows; Gemma-3's local RoPE
    known_failures = {"test_packed_documents_train_like_separate_bf16[*]": (
        "one layer-0 attention LoRA gradient per config above the bf16 bound (gemma2 k_proj lora_B 3.9e-2 vs "
        "3.6e-2; gemma3_text v_proj lora_A 4.4e-2 vs 4.2e-2): the varlen kernel rounds once where "
        "transformers' eager attention rounds after each op (docs/conformance.md, rounding points); fp32 "
        "matches tightly"),
        "test_grpo_step_bf16_within_rule[gemma2]": (
            "layer-0 mlp.gate_proj lora_B 3.16e-2 vs the bound 3.07e-2 (3% over), since gemma2's eager attention "
            "runs on the varlen kernel (transformers' unpadded causal masks are recognised): the kernel rounds once "
            "where eager attention rounds after each op, and flash-style attention rounds unnormalised "
            "probabilities (docs/conformance.md, rounding points); the fp32 GRPO step matches tightly")}
    expected_quirks = {
        "gemma2": {"attn_softcap": 1.0, "final_logit_softcap": 0.5, "sliding_window": 4, "norm_offset": 1.0},
        "gemma": {"norm_offset": 1.0, "norm_casting": "scale_in_fp32", "mlp_activation": "geglu_tanh"},
        "gemma3_text": {"disable_sdpa": True, "force_float32": True, "sliding_window": 4},
        "gemma3_mm": {"disable_sdpa": True},
    }
    quirk_probes = {
        "gemma2": {"attn_logit_softcapping": None, "final_logit_softcapping": None, "sliding_window": 4096},
        "gemma3_text": {"sliding_window": 4096},
    }
