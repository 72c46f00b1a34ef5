"""Which GGUF type each tensor gets under a quantization mix (the rule llama.cpp's mixes follow).

The rule, for a 2-D weight whose GGUF name is ``name`` in layer ``i`` of ``n``:

* 1-D tensors (norms, biases) and ``rope_freqs`` stay F32; ``f16`` / ``bf16`` / ``q8_0`` give every
  other tensor that type.
* The K-quant mixes use their base type (Q4_K for ``q4_k_m``, Q5_K for ``q5_k_m``, Q6_K for
  ``q6_k``), except: the output head (or the token embedding when the head is tied to it) is Q6_K;
  in ``q4_k_m`` and ``q5_k_m``, ``attn_v`` and ``ffn_down`` are Q6_K in the first and last eighth of
  the layers and in every third layer between them (``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2``).
* A row length that is not a multiple of 256 cannot hold K-quant blocks: Q4_K falls back to Q5_0,
  Q5_K to Q5_1, Q6_K to Q8_0; a row length not a multiple of 32 falls back to F16.
"""
from __future__ import annotations

import re

from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F

MIXES = ("f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")
FILE_TYPES = {"f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0, "q4_k_m": F.MOSTLY_Q4_K_M,
              "q5_k_m": F.MOSTLY_Q5_K_M, "q6_k": F.MOSTLY_Q6_K}
_PLAIN = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_BASE = {"q4_k_m": Q.Q4_K, "q5_k_m": Q.Q5_K, "q6_k": Q.Q6_K}
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(mix: str, name: str, shape: tuple[int, ...], n_layers: int, tied_output: bool) -> Q:
    """The GGUF type of tensor ``name`` (GGUF naming, e.g. ``blk.3.attn_v.weight``) of transformers
    shape ``shape`` (``(out, in)`` for a weight) under ``mix``; ``tied_output``: the file has no
    ``output.weight`` and the token embedding serves as the head."""
    if len(shape) < 2 or name.startswith("rope_freqs"):
        return Q.F32
    cols = shape[-1]
    if mix in _PLAIN:
        chosen = _PLAIN[mix]
        return chosen if chosen != Q.Q8_0 or cols % 32 == 0 else Q.F16
    chosen = _BASE[mix]
    stem = name.rsplit(".", 1)[0]
    layer = _LAYER.match(name)
    if stem == "output" or (tied_output and stem == "token_embd"):
        chosen = Q.Q6_K
    elif mix in ("q4_k_m", "q5_k_m") and layer and stem.endswith((".attn_v", ".ffn_down")):
        if _more_bits(int(layer.group(1)), n_layers):
            chosen = Q.Q6_K
    if cols % 256:
        chosen = _FALLBACK[chosen]
    if cols % 32:
        chosen = Q.F16
    return chosen
