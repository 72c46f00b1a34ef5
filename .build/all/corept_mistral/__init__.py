"""corept plugin for Mistral (``mistral``) and, where transformers has it, Ministral (``ministral``).

Sliding-window attention is applied by transformers' mask functions from ``config.sliding_window``;
the quirk records it so reports and the conformance kit see it.
"""
import importlib.util

from corept import Architecture, ArchitecturePlugin, FromConfig, ModuleRoles, Quirks

TRANSFORMERS_RANGE = ">=5.17,<6"

_QUIRKS = Quirks(norm_casting="llama", mlp_activation="swiglu", sliding_window=FromConfig("sliding_window"))

MISTRAL = Architecture(
    model_type="mistral",
    roles=ModuleRoles.standard("Mistral"),
    quirks=_QUIRKS,
    transformers=TRANSFORMERS_RANGE,
    aliases=(("mistral-7b-v0.3", "mistralai/Mistral-7B-v0.3"),
             ("mistral-7b-instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3")),
)

MINISTRAL = Architecture(
    model_type="ministral",
    roles=ModuleRoles.standard("Ministral"),
    quirks=_QUIRKS,
    transformers=TRANSFORMERS_RANGE,
    aliases=(("ministral-8b-instruct", "mistralai/Ministral-8B-Instruct-2410"),),
)


def _transformers_has(family: str) -> bool:
    try:
        return importlib.util.find_spec(f"transformers.models.{family}") is not None
    except ModuleNotFoundError:
        return False


plugin = ArchitecturePlugin([MISTRAL] + ([MINISTRAL] if _transformers_has("ministral") else []))
