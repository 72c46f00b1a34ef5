"""corept plugin for Gemma (``gemma``), Gemma 2 (``gemma2``) and Gemma 3 (``gemma3_text``, ``gemma3``).

* All: RMSNorm ``x_hat * (1 + w)`` computed in fp32; GeGLU (tanh, read from the config); input
  embeddings scaled by ``sqrt(hidden_size)`` in the model dtype by transformers' own model forward.
* gemma2: attention and final-logit softcapping, alternating sliding window, pre/post feed-forward
  norms (the same RMSNorm class), eager attention by default, ``query_pre_attn_scalar`` scaling.
* gemma3: fp32 forcing when fp16 is requested or bf16 is unsupported, SDPA disabled, q/k norms,
  262k vocabulary. For the multimodal ``gemma3`` only the text path is patched; its
  conditional-generation head keeps transformers' loss.
* GGUF export: llama.cpp's ``gemma`` / ``gemma2`` / ``gemma3`` (text); norm weights are written as
  ``1 + w`` from the declared norm offset. The multimodal ``gemma3`` declares none.
"""
from corept import (Architecture, ArchitecturePlugin, FromConfig, GGUFExport, KnownModel, LoadPolicy, ModuleRoles,
                    Numerics, Recorded)

TRANSFORMERS_RANGE = ">=5.17,<6"

_NORM = Numerics(norm_offset=1.0, norm_casting="scale_in_fp32")
_SOFTCAPPED = Numerics(norm_offset=1.0, norm_casting="scale_in_fp32",
                       final_logit_softcap=FromConfig("final_logit_softcapping"))
_ATTENTION = {"query_pre_attn_scalar": "the attention scaling, applied inside transformers' attention"}
_RECORDED = Recorded(attn_softcap=FromConfig("attn_logit_softcapping"), sliding_window=FromConfig("sliding_window"),
                     config=_ATTENTION)

# llama.cpp reads these under "{arch}."; None (no softcap, no window) leaves the key out
_GGUF_SOFTCAPS = {"attn_logit_softcapping": FromConfig("attn_logit_softcapping"),
                  "final_logit_softcapping": FromConfig("final_logit_softcapping"),
                  "attention.sliding_window": FromConfig("sliding_window")}

GEMMA = Architecture(
    model_type="gemma",
    roles=ModuleRoles.standard("Gemma"),
    numerics=_NORM,
    transformers=TRANSFORMERS_RANGE,
    models=(KnownModel("google/gemma-2b", aliases=("gemma-2b",)), KnownModel("google/gemma-7b", aliases=("gemma-7b",))),
    gguf=GGUFExport(arch="gemma"),
)

GEMMA2 = Architecture(
    model_type="gemma2",
    roles=ModuleRoles.standard("Gemma2"),
    load=LoadPolicy(attn_implementation="eager"),
    numerics=_SOFTCAPPED,
    recorded=_RECORDED,
    transformers=TRANSFORMERS_RANGE,
    models=(KnownModel("google/gemma-2-2b", aliases=("gemma-2-2b",)),
            KnownModel("google/gemma-2-9b", aliases=("gemma-2-9b",))),
    gguf=GGUFExport(arch="gemma2", metadata=_GGUF_SOFTCAPS),
)

_GEMMA3_LOAD = LoadPolicy(force_float32=True, disable_sdpa=True)

GEMMA3_TEXT = Architecture(
    model_type="gemma3_text",
    roles=ModuleRoles.standard("Gemma3"),
    load=_GEMMA3_LOAD,
    numerics=_SOFTCAPPED,
    recorded=_RECORDED,
    transformers=TRANSFORMERS_RANGE,
    models=(KnownModel("google/gemma-3-1b-pt", aliases=("gemma-3-1b",)),
            KnownModel("google/gemma-3-1b-it", aliases=("gemma-3-1b-it",))),
    gguf=GGUFExport(arch="gemma3", metadata=_GGUF_SOFTCAPS),
)

GEMMA3 = Architecture(
    model_type="gemma3",
    roles=ModuleRoles.standard("Gemma3", causal_lm=()),
    load=_GEMMA3_LOAD,
    numerics=_SOFTCAPPED,
    recorded=_RECORDED,
    transformers=TRANSFORMERS_RANGE,
    keep={"loss": "the multimodal conditional-generation head computes its own loss; only the text path is patched"},
    models=(KnownModel("google/gemma-3-4b-it", aliases=("gemma-3-4b-it",)),),
)

plugin = ArchitecturePlugin([GEMMA, GEMMA2, GEMMA3_TEXT, GEMMA3])
