"""The tokenizer as GGUF metadata: vocabulary, token types, scores, merges, special tokens, chat template.

Two tokenizer models exist in llama.cpp: ``gpt2`` (byte-level BPE: Llama 3, Qwen, SmolLM2) and
``llama`` (BPE over text with byte fallback, as SentencePiece writes it: Llama 2, Mistral, Gemma).
Both are read from the fast tokenizer's ``tokenizer.json``; merges, special token ids, ``add_bos``
and the chat template go through the ``gguf`` package's ``SpecialVocab``. The token list is padded to
the model's vocabulary size with unused ``[PAD<id>]`` entries, as llama.cpp requires one token per
embedding row.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
from importlib import resources
from pathlib import Path

from corept.errors import InvalidOptionsError

logger = logging.getLogger("corept")
_BYTE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _table() -> dict:
    return json.loads(resources.files("corept.export.gguf").joinpath("pretokenizers.json").read_text(encoding="utf-8"))


def _pre_tokenizer(tokenizer_json: dict) -> str:
    table = _table()
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            if regex in table["split_regex"]:
                return table["split_regex"][regex]
    types = ",".join(s.get("type", "") for s in steps if s)
    if types in table["steps"]:
        return table["steps"][types]
    logger.warning("corept: GGUF export: pre-tokenizer %s is not in corept's table; written as 'default', which "
                   "llama.cpp may tokenize differently from transformers", types or "(none)")
    return "default"


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    """Refuse, before any work, a tokenizer GGUF cannot hold for a model with ``vocab_size`` rows."""
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidOptionsError("GGUF export needs a fast tokenizer (tokenizer.json); this one is "
                                  f"{type(tokenizer).__name__}. Pass tokenizer=None to write weights only.")
    kind = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {}).get("type")
    if kind != "BPE":
        raise InvalidOptionsError(f"GGUF export supports BPE tokenizers; this one is {kind!r}. "
                                  "Pass tokenizer=None to write weights only.")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise InvalidOptionsError(f"the tokenizer has {len(vocab)} tokens (ids up to {max(vocab.values())}) but "
                                  f"the model {vocab_size} embedding rows; resize the embeddings first")


def write_vocab(writer, tokenizer, vocab_size: int) -> str:
    """Write ``tokenizer`` (a transformers fast tokenizer that passed :func:`check_tokenizer`) for a
    model with ``vocab_size`` embedding rows. Returns the GGUF tokenizer model written
    (``tokenizer.ggml.model``)."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="corept-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        tj = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        model = tj.get("model", {})
        models = _table()["tokenizer_models"]
        fallback = bool(model.get("byte_fallback"))
        kind = models["byte_fallback" if fallback else "byte_level"]
        vocab = tokenizer.get_vocab()
        by_id = {i: t for t, i in vocab.items()}
        added = {i: a for i, a in tokenizer.added_tokens_decoder.items()}
        unk = tokenizer.unk_token_id
        tokens, types, scores = [], [], []
        for i in range(vocab_size):
            token = by_id.get(i)
            if token is None:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            else:
                tokens.append(token)
                if i in added:
                    types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
                elif i == unk:
                    types.append(gguf.TokenType.UNKNOWN)
                elif fallback and _BYTE.match(token):
                    types.append(gguf.TokenType.BYTE)
                else:
                    types.append(gguf.TokenType.NORMAL)
            scores.append(-1000.0 if i in added or token is None else -float(i))
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre("default" if fallback else _pre_tokenizer(tj))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_scores(scores)  # SentencePiece's merge priority; readers derive missing merges from it
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        if merges:  # tokenizers writes merges as "a b" strings or, lately, as ["a", "b"] pairs
            writer.add_token_merges(merges)
        special = gguf.SpecialVocab(tmp, load_merges=False, n_vocab=vocab_size)
        if special.chat_template is None and getattr(tokenizer, "chat_template", None):
            special.chat_template = tokenizer.chat_template
        special.add_to_gguf(writer, quiet=True)
    return kind
