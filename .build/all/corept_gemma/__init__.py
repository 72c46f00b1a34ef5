"""corept plugin for Gemma (``gemma``), Gemma 2 (``gemma2``) and Gemma 3 (``gemma3_text``, ``gemma3``).

* All: RMSNorm ``x_hat * (1 + w)`` computed in fp32; GeGLU (tanh); input embeddings scaled by
  ``sqrt(hidden_size)`` in the model dtype (done by transformers' embedding module, recorded here).
* gemma2: attention and final-logit softcapping, alternating sliding window, pre/post feed-forward
  norms (the same RMSNorm class), eager attention by default.
* gemma3: fp32 forcing when fp16 is requested or bf16 is unsupported, SDPA disabled, q/k norms,
  262k vocabulary. For the multimodal ``gemma3`` only the text path is patched; its
  conditional-generation head keeps transformers' loss.
"""
from corept import Architecture, ArchitecturePlugin, FromConfig, ModuleRoles, Quirks

TRANSFORMERS_RANGE = ">=5.17,<6"

_GEMMA_NORM = dict(norm_offset=1.0, norm_casting="gemma", mlp_activation="geglu_tanh",
                   embedding_scale="sqrt_hidden")

GEMMA = Architecture(
    model_type="gemma",
    roles=ModuleRoles.standard("Gemma"),
    quirks=Quirks(**_GEMMA_NORM),
    transformers=TRANSFORMERS_RANGE,
    aliases=(("gemma-2b", "google/gemma-2b"), ("gemma-7b", "google/gemma-7b")),
)

GEMMA2 = Architecture(
    model_type="gemma2",
    roles=ModuleRoles.standard("Gemma2"),
    quirks=Quirks(**_GEMMA_NORM, attn_implementation="eager",
                  attn_softcap=FromConfig("attn_logit_softcapping"),
                  final_logit_softcap=FromConfig("final_logit_softcapping"),
                  sliding_window=FromConfig("sliding_window")),
    transformers=TRANSFORMERS_RANGE,
    aliases=(("gemma-2-2b", "google/gemma-2-2b"), ("gemma-2-9b", "google/gemma-2-9b")),
)

_GEMMA3_QUIRKS = Quirks(**_GEMMA_NORM, force_float32=True, disable_sdpa=True, qk_norm=True,
                        attn_softcap=FromConfig("attn_logit_softcapping"),
                        final_logit_softcap=FromConfig("final_logit_softcapping"),
                        sliding_window=FromConfig("sliding_window"))

GEMMA3_TEXT = Architecture(
    model_type="gemma3_text",
    roles=ModuleRoles.standard("Gemma3"),
    quirks=_GEMMA3_QUIRKS,
    transformers=TRANSFORMERS_RANGE,
    aliases=(("gemma-3-1b", "google/gemma-3-1b-pt"), ("gemma-3-1b-it", "google/gemma-3-1b-it")),
)

GEMMA3 = Architecture(
    model_type="gemma3",
    roles=ModuleRoles.standard("Gemma3", causal_lm=()),
    quirks=_GEMMA3_QUIRKS,
    transformers=TRANSFORMERS_RANGE,
    components=("attention", "mlp", "rope", "norm"),
    text_config_attr="text_config",
    notes="multimodal gemma3: only the text path is patched; the conditional-generation head keeps "
          "transformers' loss",
    aliases=(("gemma-3-4b-it", "google/gemma-3-4b-it"),),
)

plugin = ArchitecturePlugin([GEMMA, GEMMA2, GEMMA3_TEXT, GEMMA3])
