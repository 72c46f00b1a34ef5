"""RoPE replacement: q and k rotated by one Triton launch, scoped to one attention instance.

Transformers' attention forwards call the module global ``apply_rotary_pos_emb`` (each modeling
file has its own copy). Rebinding that global would change every model in the process, so the
instance's forward is cloned with a private globals dict in which the name points to a function
with the original's signature that runs :func:`corept_kernels.rope` (rotate-half convention).
Before that, the original and corept's are compared on a probe: a modeling file with another
convention (interleaved pairs, a different signature) keeps its own, with the reason.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
from corept_kernels import reference_only, rope

from corept.components import probe
from corept.patching.answers import Keep, Replacement
from corept.patching.sharing import shared
from corept.patching.signature import faithful, innermost

ROPE_GLOBAL = "apply_rotary_pos_emb"
_ROTARY_ARGS = 4  # q, k, cos, sin



def _signature(fn) -> inspect.Signature:
    # transformers with HF `kernels` installed wraps the function in a module object whose call
    # signature is (*args, **kwargs); its forward carries the real one
    return inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn)


def rotary_function(original, sig: inspect.Signature):
    """``apply_rotary_pos_emb`` with ``original``'s signature running corept's kernel.

    q ``[B, Hq, S, D]``, k ``[B, Hk, S, D]`` (``unsqueeze_dim=2``: ``[B, S, H, D]``), cos/sin
    ``[B, S, Dr]``. Arguments other than q, k, cos, sin and ``unsqueeze_dim`` that differ from
    their defaults are handed to ``original``.
    """
    names = list(sig.parameters)
    head, extra = names[:_ROTARY_ARGS], {n: p.default for n, p in sig.parameters.items()
                                         if n not in names[:_ROTARY_ARGS] and n != "unsqueeze_dim"}

    def apply(args: dict):
        if any(args.get(n, d) is not d for n, d in extra.items()):
            return original(**args)
        q, k, cos, sin = (args[n] for n in head)
        if args.get("unsqueeze_dim", 1) == 2:
            qo, ko = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            return qo.transpose(1, 2), ko.transpose(1, 2)
        return rope(q, k, cos, sin)

    return faithful(sig, apply, call_style="mapping", name=ROPE_GLOBAL)


def _probe(original, ours, head_dim: int, device) -> str | None:
    """Compare the two functions on random q, k and a cos/sin of HF's ``cat(freqs, freqs)`` layout."""
    q = probe.randn(1, 2, 5, head_dim, dtype=torch.float32, device=device)
    k = probe.randn(1, 1, 5, head_dim, dtype=torch.float32, device=device, scale=0.5)
    angles = probe.randn(1, 5, head_dim // 2, dtype=torch.float32, device=device, scale=math.pi)
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    try:
        with torch.no_grad():
            want = original(q, k, cos, sin)
            with reference_only():
                got = ours(q, k, cos, sin)
    except Exception as exc:  # noqa: BLE001 - any failure is a reason not to replace
        return f"{ROPE_GLOBAL} probe could not run ({type(exc).__name__}: {exc})"
    err = max(probe.scaled_error(g, w) for g, w in zip(got, want))
    if err > probe.tolerance(torch.float32):
        return (f"{ROPE_GLOBAL} of this modeling file is not the rotate-half rotation corept's kernel applies "
                f"(probe error {err:.2g})")
    return None


def rope_replacement(arch, module: nn.Module, model: nn.Module) -> Replacement | Keep:
    """Rebind ``apply_rotary_pos_emb`` for this attention instance's forward only."""
    cls = type(module).__name__
    fn = innermost(type(module).forward)
    if ROPE_GLOBAL not in getattr(getattr(fn, "__code__", None), "co_names", ()):
        return Keep(f"{cls}.forward does not call {ROPE_GLOBAL} (nothing for corept's RoPE to replace)")
    original = fn.__globals__.get(ROPE_GLOBAL)
    if original is None:
        return Keep(f"{cls}.forward's module has no {ROPE_GLOBAL}")
    sig = _signature(original)
    positional = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < _ROTARY_ARGS or any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()):
        return Keep(f"{ROPE_GLOBAL}{sig} is not (q, k, cos, sin, ...)")
    ours = shared(("rope", original), lambda: rotary_function(original, sig))
    head_dim = getattr(module, "head_dim", None) or getattr(arch.config, "head_dim", None)
    if not head_dim:
        return Keep(f"{cls} has no head_dim to probe {ROPE_GLOBAL} with")
    weight = probe.float_param(module)
    device = weight.device if weight is not None else torch.device("cpu")
    if device.type == "meta":
        return Keep(f"{cls}: cannot prove the rope replacement on meta tensors")
    reason = probe.proven(arch, ("rope", original), lambda: _probe(original, ours, int(head_dim), device))
    if reason:
        return Keep(reason)
    return Replacement(kernel="rope", forward_globals={ROPE_GLOBAL: ours})
