"""Greedy answers from a (trained) model, and the patched-vs-unpatched equality check.

:func:`answer` renders a question with the tokenizer's chat template (plain text without one),
generates greedily in eval mode and returns the new text. :func:`patched_unpatched_check` runs it
on the patched model, calls ``corept.unpatch`` and runs it again: corept's kernels must not change
a single greedy token of the trained model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


def prompt_ids(tokenizer, question, device) -> dict:
    """Token ids of ``question`` (a string, or a conversation: list of role/content dicts) with the
    generation prompt appended when the tokenizer has a chat template."""
    messages = question if isinstance(question, list) else [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    else:
        text = question if isinstance(question, str) else "\n".join(m["content"] for m in messages)
        enc = tokenizer(text, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def greedy_tokens(model: nn.Module, tokenizer, question, max_new_tokens: int = 48) -> list[int]:
    """The new token ids of a greedy generation (eval mode, no grad; training mode is restored)."""
    device = next(model.parameters()).device
    enc = prompt_ids(tokenizer, question, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    finally:
        model.train(was_training)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def answer(model: nn.Module, tokenizer, question, max_new_tokens: int = 48) -> str:
    """The model's greedy answer to ``question``, decoded without special tokens."""
    return tokenizer.decode(greedy_tokens(model, tokenizer, question, max_new_tokens),
                            skip_special_tokens=True).strip()


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end a generation: the generation config's EOS id(s) and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def ending(tokens: list[int], stop_ids: set[int], max_new_tokens: int) -> str:
    """How a greedy answer ended: ``"eos"`` (the model stopped itself) or ``"length"`` (cut off)."""
    if tokens and tokens[-1] in stop_ids:
        return "eos"
    return "length" if len(tokens) >= max_new_tokens else "eos"


def last_sentence_end(text: str) -> str:
    """``text`` up to its last ``.``, ``!`` or ``?`` (all of it when it has none)."""
    cut = max(text.rfind(c) for c in ".!?")
    return text[: cut + 1] if cut > 0 else text


@dataclass
class GreedyCheck:
    """Result of :func:`patched_unpatched_check`.

    :param stopped: ``"eos"`` when the answer ended with an end-of-sequence token, ``"length"`` when
        ``max_new_tokens`` cut it off.
    """

    equal: bool
    patched: list[int]
    unpatched: list[int]
    text: str
    stopped: str = "eos"

    def shown(self) -> str:
        """The answer as printed (see :func:`shown`)."""
        return shown(self.text, len(self.patched), self.stopped)

    def line(self) -> str:
        verdict = "identical" if self.equal else "DIFFERENT"
        return (f"generate() patched vs unpatched (greedy, {len(self.patched)} tokens): {verdict}"
                + ("" if self.equal else f" (patched {self.patched[:12]} ... unpatched {self.unpatched[:12]} ...)"))


def shown(text: str, n_tokens: int, stopped: str) -> str:
    """An answer as printed: whole when the model stopped itself, else up to its last full sentence,
    with how it ended."""
    if stopped == "eos":
        return f"{text}   [ended with EOS after {n_tokens} tokens]"
    return f"{last_sentence_end(text)}   [cut off at {n_tokens} tokens (--max-new-tokens); shown to its last full sentence]"


def answer_shown(model: nn.Module, tokenizer, question, max_new_tokens: int = 48) -> str:
    """:func:`answer` as printed by :func:`shown`."""
    tokens = greedy_tokens(model, tokenizer, question, max_new_tokens)
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return shown(text, len(tokens), ending(tokens, eos_ids(model, tokenizer), max_new_tokens))


def patched_unpatched_check(model: nn.Module, tokenizer, question, max_new_tokens: int = 48) -> GreedyCheck:
    """Greedy tokens of the patched model, then ``corept.unpatch(model)`` and again; compare.

    The model is left **unpatched** (transformers' and peft's own forwards): call it last.
    """
    import corept

    patched = greedy_tokens(model, tokenizer, question, max_new_tokens)
    corept.unpatch(model)
    unpatched = greedy_tokens(model, tokenizer, question, max_new_tokens)
    return GreedyCheck(patched == unpatched, patched, unpatched,
                       tokenizer.decode(patched, skip_special_tokens=True).strip(),
                       ending(patched, eos_ids(model, tokenizer), max_new_tokens))
