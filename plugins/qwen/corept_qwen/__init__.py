"""corept plugin for Qwen2 (``qwen2``), Qwen3 (``qwen3``) and Qwen3-MoE (``qwen3_moe``).

* qwen2 carries a bias on q/k/v: the fused LoRA q/k/v group keeps peft's path (reported).
* qwen3 applies per-head ``q_norm``/``k_norm`` (the same RMSNorm class) before RoPE: patched as norms.
* qwen3_moe: norms, RoPE, attention, loss and the experts are patched: the stacked experts run as
  grouped GEMMs (LoRA on them included, peft's ``target_parameters``); the router and the block
  around the experts stay transformers'.
* GGUF export: qwen2 and qwen3 as llama.cpp's ``qwen2`` / ``qwen3``; qwen3_moe declares none yet
  (its stacked experts need their own tensor layout).
"""
from corept import Architecture, ArchitecturePlugin, FromConfig, GGUFExport, KnownModel, ModuleRoles, Recorded

TRANSFORMERS_RANGE = ">=5.17,<6"

_QWEN25 = dict(vocab_size=152064, max_position_embeddings=131072, rope_theta=1000000.0, tie_word_embeddings=False,
               use_sliding_window=False)

QWEN2 = Architecture(
    model_type="qwen2",
    roles=ModuleRoles.standard("Qwen2"),
    recorded=Recorded(sliding_window=FromConfig("sliding_window")),
    transformers=TRANSFORMERS_RANGE,
    models=(
        KnownModel("Qwen/Qwen2.5-7B", aliases=("qwen2.5-7b",), config=dict(
            _QWEN25, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4)),
        KnownModel("Qwen/Qwen2.5-7B-Instruct", aliases=("qwen2.5-7b-instruct",)),
        KnownModel("Qwen/Qwen2.5-14B", config=dict(
            _QWEN25, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
            num_key_value_heads=8)),
        KnownModel("Qwen/Qwen2.5-32B", config=dict(
            _QWEN25, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
            num_key_value_heads=8)),
    ),
    gguf=GGUFExport(arch="qwen2"),
)

QWEN3 = Architecture(
    model_type="qwen3",
    roles=ModuleRoles.standard("Qwen3"),
    recorded=Recorded(sliding_window=FromConfig("sliding_window")),
    transformers=TRANSFORMERS_RANGE,
    models=(
        KnownModel("Qwen/Qwen3-8B", aliases=("qwen3-8b",), config=dict(
            hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
            rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)),
        KnownModel("Qwen/Qwen3-4B", aliases=("qwen3-4b",)),
        KnownModel("Qwen/Qwen3-0.6B", aliases=("qwen3-0.6b",)),
    ),
    gguf=GGUFExport(arch="qwen3"),
)

QWEN3_MOE = Architecture(
    model_type="qwen3_moe",
    roles=ModuleRoles.standard("Qwen3Moe", mlp=(), experts=("Qwen3MoeExperts",)),
    transformers=TRANSFORMERS_RANGE,
    keep={"mlp": "the MoE block around the experts (its top-k router) stays transformers'; the experts are "
                 "patched as the experts component"},
    models=(KnownModel("Qwen/Qwen3-30B-A3B", aliases=("qwen3-30b-a3b",), config=dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)),),
)

plugin = ArchitecturePlugin([QWEN2, QWEN3, QWEN3_MOE])
