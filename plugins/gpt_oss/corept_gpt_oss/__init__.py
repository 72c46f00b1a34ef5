"""corept plugin for OpenAI's gpt-oss (``model_type`` ``gpt_oss``): a mixture-of-experts decoder.

What corept patches, and what stays transformers' own (``corept.report(model)`` shows each reason):

* **RMSNorm** (patched): ``GptOssRMSNorm`` multiplies the normalised row by its weight in fp32 and
  casts once at the end: ``norm_casting="scale_in_fp32"``, no offset. transformers keeps these
  weights in fp32 when it loads an fp16 model (``_keep_in_fp32_modules``); the kernel takes an fp32
  weight with a 16-bit input and returns the input's dtype, as the module does.
* **Loss** (patched): ``GptOssForCausalLM`` computes plain ``lm_head`` logits and cross-entropy. With
  ``output_router_logits=True`` the head adds ``router_aux_loss_coef`` x the load-balancing loss;
  corept's fused loss adds the same term (the aux loss from the original head without labels, one
  position's logits), so no full logits are materialised then either.
* **Attention** (patched): every layer adds a learned per-head sink logit (``GptOssAttention.sinks``,
  passed as ``s_aux``) to the softmax denominator. The shared attention component runs it on
  corept's varlen kernel with ``sinks=``: transformers' eager path hands each layer a materialized
  causal or sliding mask, which the component recognises as the plain one for unpadded rows (one
  check per mask and step) and replaces by the kernel's own causal/window schedule, documents split
  where ``position_ids`` restart. Padded batches keep transformers' eager attention. Sliding
  (``sliding_window``) and full layers alternate per ``config.layer_types``.
* **RoPE** (kept): ``GptOssRotaryEmbedding`` returns cos/sin of ``head_dim / 2`` (no
  ``cat(freqs, freqs)``), which this modeling file's ``apply_rotary_pos_emb`` applies to both
  halves; corept's kernel reads a narrower table as partial rotary (only the first dims rotate), so
  its probe cannot reproduce the forward. YaRN itself would need nothing: the rotary module folds
  its frequencies and ``attention_scaling`` into cos/sin.
* **Experts** (patched): ``GptOssExperts`` keeps stacked expert weights in the transposed layout
  (``[E, in, out]``) with per-expert biases, gate/up interleaved in one projection, and a clamped
  SwiGLU ``(clamp(up) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``
  (``swiglu_alpha`` 1.702, ``swiglu_limit`` 7.0). corept's shared experts component runs both
  projections as grouped GEMMs (biases and LoRA included) and calls the module's own
  ``_apply_gate`` between them, so the clamp is transformers' to the bit.
* **MoE block** (kept): ``GptOssMLP``'s top-k router with a bias (softmax over the selected logits)
  stays transformers', so routing and its gradient are exact.
* **LoRA**: the default targets are the attention projections and the experts' stacked weights
  (peft's ``target_parameters``, on the grouped GEMMs). q/k/v/o all carry a bias
  (``attention_bias``); the fused LoRA paths add it.
* **Packing**: transformers' ``GptOssModel.forward`` builds its masks without ``position_ids``, so a
  padding-free row attends across its documents on transformers' eager path. corept's attention
  takes packed rows (the collator's ``cu_seq_lens`` or restarting ``position_ids``) and keeps the
  documents apart; ``corept train``'s check (``corept.training.packing_check``) still pads a model
  whose attention crosses documents (for example one loaded with ``patch=False``).
* No GGUF export declared yet: the stacked expert tensors and their biases need a tensor layout of
  their own (as for qwen3_moe).
"""
from corept import Architecture, ArchitecturePlugin, FromConfig, KnownModel, ModuleRoles, Numerics, Recorded

TRANSFORMERS_RANGE = ">=5.17,<6"

KEEP = {
    "rope": ("GptOssRotaryEmbedding returns cos/sin of head_dim / 2, which this modeling file's "
             "apply_rotary_pos_emb applies to both halves; corept's rope kernel takes a table that narrow as "
             "partial rotary (YaRN itself is folded into cos/sin by the rotary module)"),
    "mlp": ("GptOssMLP's biased top-k router stays transformers'; its GptOssExperts are patched as the experts "
            "component"),
}

RECORDED = Recorded(
    sliding_window=FromConfig("sliding_window"),
    config={
        "layer_types": "which layers use the sliding window (sliding_attention) and which attend fully; "
                       "transformers' mask functions, per layer",
        "swiglu_alpha": "the sigmoid gain of the experts' clamped SwiGLU (GptOssExperts._apply_gate, called by corept)",
        "swiglu_limit": "the clamp of gate (above) and up (both sides) before that SwiGLU (GptOssExperts._apply_gate)",
        "router_aux_loss_coef": "weight of the load-balancing loss GptOssForCausalLM adds when "
                                "output_router_logits is set (that call runs transformers' head)",
        "rope_parameters": "YaRN frequencies and attention scaling, folded into cos/sin by GptOssRotaryEmbedding "
                           "(kept)",
    },
)


def _published(layers: int, experts: int) -> dict:
    """The memory-shaping fields of the published ``config.json`` (``layer_types`` defaults to the
    sliding/full alternation those files list)."""
    return dict(hidden_size=2880, intermediate_size=2880, num_hidden_layers=layers, num_local_experts=experts,
                num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                vocab_size=201088, max_position_embeddings=131072, sliding_window=128, rms_norm_eps=1e-5,
                attention_bias=True, tie_word_embeddings=False, swiglu_limit=7.0, router_aux_loss_coef=0.9,
                rope_theta=150000.0, rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                                       original_max_position_embeddings=4096, truncate=False))


GPT_OSS = Architecture(
    model_type="gpt_oss",
    roles=ModuleRoles.standard("GptOss", mlp=(), experts=("GptOssExperts",)),
    numerics=Numerics(norm_casting="scale_in_fp32"),
    recorded=RECORDED,
    transformers=TRANSFORMERS_RANGE,
    keep=KEEP,
    models=(
        KnownModel("openai/gpt-oss-20b", aliases=("gpt-oss-20b",), config=_published(layers=24, experts=32)),
        KnownModel("openai/gpt-oss-120b", aliases=("gpt-oss-120b",), config=_published(layers=36, experts=128)),
    ),
)

plugin = ArchitecturePlugin([GPT_OSS])
