"""The kit's tiny configs: :func:`corept.tiny.tiny_config` with every scalar field moved off its default."""
from __future__ import annotations


def tiny_config(model_type: str, **overrides):
    """A tiny ``model_type`` config (hidden 64, 2 layers, GQA 4/2, head_dim 24, vocabulary 257) whose
    scalar multiplier / scale / softcap fields are off their defaults (:func:`corept.tiny.perturbed`),
    so a patch that ignores one of them fails the matrix; ``overrides`` win over both."""
    from corept.tiny import tiny_config as build

    return build(model_type, perturb=True, **overrides)
