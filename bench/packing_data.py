"""The documents of the packing benchmark (bench/packing.py): a seeded heavy-tailed length mix.

Lengths follow a **log-normal clipped to [low, high]**: ``round(exp(N(ln median, sigma)))``. SFT
corpora (instruction/response pairs, chat turns, multi-turn conversations) are roughly log-normal
in length: most examples a few hundred tokens, few short ones, a long tail of long conversations
and documents. With the GPU default (median 400, sigma 1.0, clipped to 32..8192) about three in
four documents fall between 100 and 1,000 tokens, the mean is ~650 and a few percent exceed
2,000, up to the 8k clip: the regime where padding a batch to its longest row wastes most of the
computed positions and packing pays. Documents are drawn until their tokens reach the target
(``steps x tokens per step``), so every variant can train one epoch over the same documents.

Token ids are uniform random ids of the model's vocabulary that never hit its special tokens
(bos, eos, pad, unk), so a position is padding exactly when its id is the pad id. Everything here
is seeded and deterministic; module level and the length functions are standard library only (the
driver summarises the mix without importing torch); :func:`dataset` runs in a worker.
"""
from __future__ import annotations

import math
import random

GPU_MIX = {"median": 400, "sigma": 1.0, "low": 32, "high": 8192}
SMOKE_MIX = {"median": 40, "sigma": 1.0, "low": 4, "high": 256}


def lengths(target_tokens: int, seed: int, *, median: float, sigma: float, low: int, high: int) -> list[int]:
    """Document lengths drawn from the clipped log-normal until their sum reaches ``target_tokens``."""
    rng = random.Random(seed)
    out: list[int] = []
    total = 0
    while total < target_tokens:
        n = min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))
        out.append(n)
        total += n
    return out


def _rank(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile ``q`` (0..1) of ascending ``sorted_values``."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def summary(lens: list[int]) -> dict:
    """Count, total, mean/median/p90/p99/max/min and the shares of short, mid-size and long documents."""
    s = sorted(lens)
    n = len(s)
    return {"docs": n, "tokens": sum(s), "mean": round(sum(s) / n, 1), "median": _rank(s, 0.5), "p90": _rank(s, 0.9),
            "p99": _rank(s, 0.99), "max": s[-1], "min": s[0],
            "share_100_to_1000": round(sum(100 <= x <= 1000 for x in s) / n, 3),
            "share_over_2048": round(sum(x > 2048 for x in s) / n, 3)}


def special_ids(tokenizer) -> set[int]:
    """The ids a document must never contain: bos, eos, pad, unk (and any other special token)."""
    return {i for i in tokenizer.all_special_ids if i is not None}


def token_ids(lens: list[int], vocab: int, avoid: set[int], seed: int) -> list[list[int]]:
    """One list of uniform random ids per length, none of them in ``avoid``."""
    rng = random.Random(seed * 7919 + 1)
    docs = []
    for n in lens:
        ids = []
        while len(ids) < n:
            t = rng.randrange(vocab)
            if t not in avoid:
                ids.append(t)
        docs.append(ids)
    return docs


def dataset(lens: list[int], vocab: int, avoid: set[int], seed: int):
    """A pre-tokenized ``datasets.Dataset`` (one ``input_ids`` column): what SFTTrainer packs or pads.

    No ``labels`` column: TRL builds labels = input ids (every token is trained, as in pre-training).
    """
    import datasets

    return datasets.Dataset.from_dict({"input_ids": token_ids(lens, vocab, avoid, seed)})
