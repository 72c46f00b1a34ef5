"""GGUF tensor names and layouts from an architecture's :class:`~corept.GGUFExport`.

:func:`tensor_plan` maps every transformers weight name to its GGUF name (the plugin's declared
names first, then the ``gguf`` package's table for the declared ``arch``) and records the two
layout changes llama.cpp expects: norm weights stored with the architecture's norm offset added,
and, for llama.cpp's interleaved-RoPE architectures, q/k projection rows permuted from
transformers' half-split layout to adjacent pairs. :func:`to_file` applies them, :func:`from_file`
undoes them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from corept.errors import InvalidOptionsError


@dataclass(frozen=True)
class TensorPlan:
    """One weight: its transformers and GGUF names, the norm offset to add (0: none) and, for a
    permuted q/k projection, the number of heads its rows hold."""

    hf: str
    gguf: str
    norm_offset: float = 0.0
    rotary_heads: int = 0


def _declared(patterns: dict[str, str]):
    compiled = [(re.compile("^" + re.escape(k).replace(r"\{bid\}", r"(?P<bid>\d+)") + "$"), v)
                for k, v in patterns.items()]

    def lookup(module: str) -> str | None:
        for rx, target in compiled:
            m = rx.match(module)
            if m:
                return target.format(bid=m.group("bid")) if "bid" in rx.groupindex else target
        return None
    return lookup


def _table(arch: str, n_layers: int):
    import gguf

    enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if enum is None:
        return lambda module: None
    table = gguf.get_tensor_name_map(enum, n_layers)
    return table.get_name


def tensor_plan(model, resolved, keys: list[str]) -> list[TensorPlan]:
    """The plan for the state-dict ``keys`` of ``model`` (a transformers model, its weights under
    their plain names) of the resolved architecture ``resolved``. Raises
    :class:`~corept.errors.InvalidOptionsError` naming every key that has no GGUF name."""
    export = resolved.declaration.gguf
    config = resolved.config
    n_layers = int(config.num_hidden_layers)
    declared, table = _declared(export.tensors), _table(export.arch, n_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    proj = resolved.projections
    if export.interleaved_rotary and proj.qkv:
        raise InvalidOptionsError(f"{resolved.model_type}: interleaved RoPE with a fused qkv projection is not "
                                  "supported by the GGUF export")
    plans, missing = [], []
    for key in keys:
        module, _, suffix = key.rpartition(".")
        name = declared(module) or table(module)
        if name is None:
            missing.append(key)
            continue
        owner = model.get_submodule(module)
        offset = resolved.numerics.norm_offset if type(owner).__name__ in resolved.roles.norm else 0.0
        parent = model.get_submodule(module.rpartition(".")[0]) if "." in module else model
        rotary = 0
        if export.interleaved_rotary and type(parent).__name__ in resolved.roles.attention:
            leaf = module.rpartition(".")[2]
            rotary = heads if leaf == proj.q else kv_heads if leaf == proj.k else 0
        plans.append(TensorPlan(key, f"{name}.{suffix}", float(offset or 0.0), rotary))
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        head = [k for k in missing if k.endswith("lm_head.weight")]
        if head and len(missing) == 1:
            raise InvalidOptionsError(
                f"{resolved.model_type}: this model's output head is not tied to its embedding, but llama.cpp's "
                f"{export.arch!r} architecture reads the head from the token embedding (no GGUF name for {head[0]}); "
                "only tied models of this architecture can be exported")
        raise InvalidOptionsError(
            f"{resolved.model_type}: no GGUF name for {shown} (GGUF architecture {export.arch!r}); the plugin "
            f"{resolved.plugin!r} can name them in GGUFExport(tensors={{'<module path with {{bid}}>': "
            "'blk.{bid}.<gguf name>'}})")
    return plans


def _permute(w: torch.Tensor, heads: int, inverse: bool) -> torch.Tensor:
    """Rows of each head: ``[r0..r(d/2-1), i0..i(d/2-1)]`` (transformers) <-> ``[r0, i0, r1, i1, ...]``."""
    d = w.shape[0] // heads
    if inverse:
        return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_file(plan: TensorPlan, t: torch.Tensor) -> torch.Tensor:
    """A transformers tensor in the layout GGUF stores."""
    if plan.norm_offset:
        t = t + plan.norm_offset
    if plan.rotary_heads:
        t = _permute(t, plan.rotary_heads, inverse=False)
    return t


def from_file(plan: TensorPlan, t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_file`."""
    if plan.rotary_heads:
        t = _permute(t, plan.rotary_heads, inverse=True)
    if plan.norm_offset:
        t = t - plan.norm_offset
    return t
