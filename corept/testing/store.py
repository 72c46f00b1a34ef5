"""Per-class cache of the conformance suite: configs, fp32 base models, saved folders, batches."""
from __future__ import annotations

import copy
import re

import torch

from corept.testing import builders as B


def glob(name: str, pattern: str) -> bool:
    """``*`` matches anything; every other character (``[`` included) is literal."""
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), name) is not None


def same(a, b) -> bool:
    """Bitwise equal tensors, or both ``None`` (a parameter no loss reaches, e.g. a vision tower)."""
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


class Store:
    """Per-class cache: configs, fp32 base models, saved folders (for 4-bit loads)."""

    def __init__(self, suite: type, tmp_path_factory):
        self.suite, self.tmp = suite, tmp_path_factory
        self._configs, self._bases, self._folders = {}, {}, {}

    def config(self, name: str):
        if name not in self._configs:
            self._configs[name] = self.suite.configs[name]()
        return copy.deepcopy(self._configs[name])

    def base(self, name: str):
        if name not in self._bases:
            self._bases[name] = B.build_base(self.config(name), self.suite.model_classes.get(name), self.suite.seed)
        return self._bases[name]

    def arch(self, name: str):
        """The resolved architecture of config ``name``."""
        return B.architecture_of(self.config(name))

    def folder(self, name: str):
        if name not in self._folders:
            self._folders[name] = B.save_folder(self.base(name), self.tmp.mktemp(f"corept-{name}"))
        return self._folders[name]

    def batch(self, name: str, seed: int = 1) -> dict:
        return B.make_batch(B.vocab_size(self.base(name)), self.suite.batch_size, self.suite.seq_len, seed)
