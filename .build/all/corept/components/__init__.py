"""Kernel-backed replacements shared by every architecture, parametrized by declared quirks.

Plugins call these factories from their hook implementations (usually one line each); the
``corept.generic`` fallback plugin calls them for architectures whose plugin only declares data.
Each factory returns a :class:`~corept.replacement.Replacement` or ``None`` when the module does
not have the shape the replacement needs (the caller reports that as a fallback).
"""
from corept.components.loss import causal_lm_replacement
from corept.components.mlp import mlp_replacement
from corept.components.norm import norm_replacement
from corept.components.rope import rope_replacement

__all__ = ["norm_replacement", "mlp_replacement", "rope_replacement", "causal_lm_replacement"]
