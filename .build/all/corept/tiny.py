"""Tiny random models and tokenizers built offline, for demos and tests.

Nothing here names an architecture: a tiny config is derived from any ``model_type`` transformers
knows, with small sizes that still exercise GQA, a head_dim that differs from hidden/heads and a
vocabulary that is not a power of two.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

TINY_SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, vocab_size=257, max_position_embeddings=512)


def tiny_config(model_type: str, **overrides):
    """A small config of ``model_type`` (``AutoConfig.for_model``) with :data:`TINY_SIZES` applied."""
    from transformers import AutoConfig

    values = {**TINY_SIZES, **overrides}
    config = AutoConfig.for_model(model_type, **values)
    text = config.get_text_config()
    if text is not config:
        for k, v in values.items():
            setattr(text, k, v)
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


def tiny_model(model_type: str, *, seed: int = 0, dtype=None, **overrides):
    """A randomly initialised causal LM of ``model_type`` from :func:`tiny_config`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
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
