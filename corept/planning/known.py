"""Built-in copies of a few public model configs, so ``corept plan`` answers offline.

Only the fields that shape memory are kept (sizes, heads, vocabulary, tying, rope). A local
folder or a cached download of the same name always wins over these copies; the plan says which
one it used. Keys are matched case-insensitively, with or without the organisation prefix.
"""
from __future__ import annotations

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

KNOWN_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-3.2-1B": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "meta-llama/Llama-3.2-3B": dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "meta-llama/Llama-3.1-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_scaling=dict(_LLAMA3_ROPE)),
    "meta-llama/Llama-3.1-70B": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_scaling=dict(_LLAMA3_ROPE)),
    "mistralai/Mistral-7B-v0.3": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
        max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False, sliding_window=None),
    "Qwen/Qwen2.5-7B": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
        rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False),
    "Qwen/Qwen2.5-14B": dict(
        model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, max_position_embeddings=131072,
        rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False),
    "Qwen/Qwen2.5-32B": dict(
        model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, max_position_embeddings=131072,
        rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False),
    "Qwen/Qwen3-8B": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-6),
}

_INDEX = {}
for _full in KNOWN_CONFIGS:
    _INDEX[_full.lower()] = _full
    _INDEX[_full.split("/", 1)[1].lower()] = _full
_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit", "-instruct", "-base")


def known_config(name: str) -> tuple[str, dict] | None:
    """``(canonical name, config dict)`` for a built-in model name, or ``None``.

    The organisation prefix is optional and instruct / base / pre-quantized variants map to the
    base config (same shapes): ``unsloth/Llama-3.2-1B-Instruct`` -> ``meta-llama/Llama-3.2-1B``.
    """
    key = str(name).strip().lower()
    for _ in range(6):
        if key in _INDEX:
            return _INDEX[key], dict(KNOWN_CONFIGS[_INDEX[key]])
        if "/" in key:
            key = key.split("/", 1)[1]
            continue
        stripped = next((key[: -len(s)] for s in _SUFFIXES if key.endswith(s)), None)
        if stripped is None:
            return None
        key = stripped
    return None
