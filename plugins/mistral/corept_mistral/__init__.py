"""corept plugin for Mistral (``mistral``) and, where transformers has it, Ministral (``ministral``).

Sliding-window attention is applied by transformers' mask functions from ``config.sliding_window``;
the declaration records it so reports, the planner and the conformance kit see it. GGUF export
writes Mistral as llama.cpp's ``llama`` architecture (as llama.cpp's own converter does); Ministral
declares no GGUF mapping.
"""
import importlib.util

from corept import Architecture, ArchitecturePlugin, FromConfig, GGUFExport, KnownModel, ModuleRoles, Recorded

TRANSFORMERS_RANGE = ">=5.17,<6"

_RECORDED = Recorded(sliding_window=FromConfig("sliding_window"))

MISTRAL = Architecture(
    model_type="mistral",
    roles=ModuleRoles.standard("Mistral"),
    recorded=_RECORDED,
    transformers=TRANSFORMERS_RANGE,
    models=(
        KnownModel("mistralai/Mistral-7B-v0.3", aliases=("mistral-7b-v0.3",), config=dict(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=32768,
            rope_theta=1000000.0, tie_word_embeddings=False, sliding_window=None)),
        KnownModel("mistralai/Mistral-7B-Instruct-v0.3", aliases=("mistral-7b-instruct-v0.3",)),
    ),
    gguf=GGUFExport(arch="llama", interleaved_rotary=True),
)

MINISTRAL = Architecture(
    model_type="ministral",
    roles=ModuleRoles.standard("Ministral"),
    recorded=_RECORDED,
    transformers=TRANSFORMERS_RANGE,
    models=(KnownModel("mistralai/Ministral-8B-Instruct-2410", aliases=("ministral-8b-instruct",)),),
)


def _transformers_has(family: str) -> bool:
    try:
        return importlib.util.find_spec(f"transformers.models.{family}") is not None
    except ModuleNotFoundError:
        return False


plugin = ArchitecturePlugin([MISTRAL] + ([MINISTRAL] if _transformers_has("ministral") else []))
