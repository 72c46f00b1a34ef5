"""corept plugin for IBM Granite (``granite``): a Llama with four multipliers.

* ``logits_scaling``: the causal-LM head divides the logits by it; corept's fused loss must too,
  so it is a kernel parameter (``Numerics.logit_scale``).
* ``embedding_multiplier``, ``residual_multiplier``, ``attention_multiplier``: applied inside
  transformers' model, decoder-layer and attention forwards, which corept does not replace; they
  are recorded, so the conformance kit knows they are handled.
* GGUF export: llama.cpp's ``granite`` architecture (the ``gguf`` package names its tensors; RoPE on
  adjacent pairs, as for Llama) with the four multipliers as its metadata keys.
"""
from corept import Architecture, ArchitecturePlugin, FromConfig, GGUFExport, ModuleRoles, Numerics, Recorded

GRANITE = Architecture(
    model_type="granite",
    roles=ModuleRoles.standard("Granite"),
    numerics=Numerics(logit_scale=FromConfig.reciprocal("logits_scaling")),
    recorded=Recorded(config={
        "embedding_multiplier": "GraniteModel.forward scales the input embeddings",
        "residual_multiplier": "GraniteDecoderLayer.forward scales each residual branch",
        "attention_multiplier": "the softmax scale of GraniteAttention",
    }),
    transformers=">=5.17,<6",
    gguf=GGUFExport(arch="granite", interleaved_rotary=True, metadata={
        "logit_scale": FromConfig("logits_scaling"), "embedding_scale": FromConfig("embedding_multiplier"),
        "residual_scale": FromConfig("residual_multiplier"), "attention.scale": FromConfig("attention_multiplier")}),
)

plugin = ArchitecturePlugin([GRANITE])
