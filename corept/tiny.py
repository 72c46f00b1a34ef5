"""Tiny random models and tokenizers built offline, for demos and tests.

Nothing here names an architecture: a tiny config is derived from any ``model_type`` transformers
knows, with small sizes that still exercise GQA, a head_dim that differs from hidden/heads and a
vocabulary that is not a power of two.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

TINY_SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, vocab_size=257, max_position_embeddings=512)
#: config fields that scale something (multipliers, scales, softcaps): :func:`tiny_config` moves them
#: off their defaults so a patch that ignores one shows
SCALAR_FIELD = re.compile(r"(multiplier|scale|scaling|softcap|softcapping|scalar)$")
SOFTCAP = 0.5  # small enough that tanh bends the logits of a tiny random model
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def scalar_fields(config) -> dict[str, object]:
    """``{name: value}`` of the text config's scalar multiplier / scale / softcap fields (numbers,
    or ``None`` for softcaps that are off)."""
    text = config.get_text_config()
    out = {}
    for name, value in text.to_dict().items():
        if not SCALAR_FIELD.search(name) or isinstance(value, (bool, dict, list, str)):
            continue
        if isinstance(value, (int, float)) or (value is None and "softcap" in name):
            out[name] = value
    return out


def perturbed(name: str, value):
    """The value :func:`tiny_config` gives a scalar field: softcaps :data:`SOFTCAP`, others 2.5x (0.5 for 0);
    an integer field stays an integer (configs validate their field types)."""
    if "softcap" in name:
        return SOFTCAP
    if isinstance(value, int) and not isinstance(value, bool) and value:
        return int(round(value * 2.5))
    return float(value) * 2.5 if value else 0.5


def _valid_token_ids(text, vocab: int) -> None:
    """Special token ids inside the tiny vocabulary (a default like ``pad_token_id=32000`` is not)."""
    for name in _TOKEN_IDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and value >= vocab:
            setattr(text, name, vocab - 1 - _TOKEN_IDS.index(name))
        elif isinstance(value, list):
            setattr(text, name, [v for v in value if v < vocab] or [vocab - 1])


def tiny_config(model_type: str, *, perturb: bool = False, **overrides):
    """A small config of ``model_type`` (``AutoConfig.for_model``) with :data:`TINY_SIZES` applied.

    :param perturb: move every scalar multiplier / scale / softcap field (:func:`scalar_fields`)
        off its default first (:func:`perturbed`); ``overrides`` still win.
    """
    from transformers import AutoConfig

    values = {**TINY_SIZES, **overrides}
    config = AutoConfig.for_model(model_type, **values)
    text = config.get_text_config()
    if perturb:
        for name, value in scalar_fields(config).items():
            if name not in overrides:
                setattr(text, name, perturbed(name, value))
    if text is not config:
        for k, v in values.items():
            setattr(text, k, v)
    _valid_token_ids(text, text.vocab_size)
    return config


def tiny_tokenizer(texts: Iterable[str], vocab_size: int = TINY_SIZES["vocab_size"]):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as ``PreTrainedTokenizerFast``.

    Special tokens: ``<pad>`` (0), ``<eos>`` (1), ``<bos>`` (2), ``<unk>`` (3).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def tiny_model(model_type: str, *, seed: int = 0, dtype=None, perturb: bool = False, **overrides):
    """A randomly initialised causal LM of ``model_type`` from :func:`tiny_config`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, perturb=perturb, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype) if dtype is not None else model


def save_tiny(model, tokenizer, folder: str | Path) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` to ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
