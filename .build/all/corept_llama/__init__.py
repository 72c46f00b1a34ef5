"""corept plugin for the Llama family (``model_type`` ``llama``).

Llama 3.x rope scaling needs nothing special: the model's rotary module computes the scaled
cos/sin and corept's RoPE kernel applies them as given. Tied and untied embeddings both work with
the fused loss (it reads ``lm_head.weight`` whichever it is).
"""
from corept import Architecture, ArchitecturePlugin, FromConfig, ModuleRoles, Quirks

TRANSFORMERS_RANGE = ">=5.17,<6"

LLAMA = Architecture(
    model_type="llama",
    roles=ModuleRoles.standard("Llama"),
    quirks=Quirks(norm_casting="llama", mlp_activation="swiglu",
                  attention_bias=FromConfig("attention_bias", False)),
    transformers=TRANSFORMERS_RANGE,
    aliases=(
        ("llama-3.1-8b", "meta-llama/Llama-3.1-8B"),
        ("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct"),
        ("llama-3.2-1b", "meta-llama/Llama-3.2-1B"),
        ("llama-3.2-3b", "meta-llama/Llama-3.2-3B"),
        ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ),
)

plugin = ArchitecturePlugin([LLAMA])
