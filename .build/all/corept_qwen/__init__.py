"""corept plugin for Qwen2 (``qwen2``), Qwen3 (``qwen3``) and Qwen3-MoE (``qwen3_moe``).

* qwen2 carries a bias on q/k/v: the fused LoRA QKV path falls back to peft's (reported).
* qwen3 applies per-head ``q_norm``/``k_norm`` (the same RMSNorm class) before RoPE: patched as norms.
* qwen3_moe: norms, RoPE, attention and loss are patched; the experts stay transformers' own.
"""
from corept import Architecture, ArchitecturePlugin, FromConfig, ModuleRoles, Quirks

TRANSFORMERS_RANGE = ">=5.17,<6"

QWEN2 = Architecture(
    model_type="qwen2",
    roles=ModuleRoles.standard("Qwen2"),
    quirks=Quirks(norm_casting="llama", mlp_activation="swiglu", attention_bias=True,
                  sliding_window=FromConfig("sliding_window")),
    transformers=TRANSFORMERS_RANGE,
    aliases=(("qwen2.5-7b", "Qwen/Qwen2.5-7B"), ("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct")),
)

QWEN3 = Architecture(
    model_type="qwen3",
    roles=ModuleRoles.standard("Qwen3"),
    quirks=Quirks(norm_casting="llama", mlp_activation="swiglu", qk_norm=True,
                  attention_bias=FromConfig("attention_bias", False), sliding_window=FromConfig("sliding_window")),
    transformers=TRANSFORMERS_RANGE,
    aliases=(("qwen3-8b", "Qwen/Qwen3-8B"), ("qwen3-4b", "Qwen/Qwen3-4B"), ("qwen3-0.6b", "Qwen/Qwen3-0.6B")),
)

QWEN3_MOE = Architecture(
    model_type="qwen3_moe",
    roles=ModuleRoles.standard("Qwen3Moe", mlp=()),
    quirks=Quirks(norm_casting="llama", mlp_activation="swiglu", qk_norm=True,
                  attention_bias=FromConfig("attention_bias", False)),
    transformers=TRANSFORMERS_RANGE,
    components=("attention", "rope", "norm", "loss"),
    notes="experts (the MoE MLP) stay transformers' implementation",
    aliases=(("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B"),),
)

plugin = ArchitecturePlugin([QWEN2, QWEN3, QWEN3_MOE])
