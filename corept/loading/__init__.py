"""Loading: ``corept.load`` (:mod:`.load`), names to folders (:mod:`.names`), and models that ship
inside packages (:mod:`.embedded`)."""
from corept.loading.loader import (LoadOptions, bf16_supported, choose_dtype, disable_cpu_4bit_repack, load,
                                 load_tokenizer, validate_options)

__all__ = ["LoadOptions", "bf16_supported", "choose_dtype", "disable_cpu_4bit_repack", "load", "load_tokenizer",
           "validate_options"]
