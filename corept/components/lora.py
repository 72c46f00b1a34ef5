"""The shared answers of ``corept_patch_lora``: peft LoRA linears on corept's fused LoRA kernels.

Per module the hook is asked about (``arch.projections`` names the linears):

* a gated MLP whose projections all take the fast path: its forward becomes one
  ``corept_kernels.lora.lora_mlp`` call (separate gate/up, or a fused ``gate_up`` linear split in
  halves, gate first);
* an attention module: q/k/v become one ``lora_qkv`` call (:class:`~corept.lora.qkv_group.QKVGroup`),
  a fused ``qkv`` linear and ``o`` one ``lora_o`` call each;
* any other LoRA linear (in a module that could not be fused as a whole, or outside attention
  and MLP modules): one ``lora_o`` call.

Every fused forward keeps peft's forward for calls it cannot take (eval mode, dropout, disabled or
merged adapters, extra arguments); a linear whose adapter can never take the fast path (bias,
DoRA, 8-bit base...) is left alone with the reason. A fused MLP replaces the MLP's own math, so it
is proven on a probe like the shared MLP.
"""
from __future__ import annotations

import torch.nn as nn
from corept_kernels.lora import lora_fast_path_reason, lora_mlp, lora_o, read_lora_weights

from corept.components import probe
from corept.components.experts import experts_lora_replacement
from corept.lora.param_wrappers import is_param_wrapper, wrapper_chain
from corept.components.mlp import linears
from corept.components.norm import single_input
from corept.lora.fast_path import group_reason, is_training_call
from corept.lora.qkv_group import QKVGroup
from corept.patching.answers import Keep, Replacement
from corept.patching.sharing import shared
from corept.patching.signature import unbound_forward
from corept.patching.engine import state_of


def _is_lora(module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _linear_forward(unfused):
    def forward(self, x, *args, **kwargs):
        if not args and not kwargs and is_training_call(self, x) and lora_fast_path_reason(self, allow_bias=True) is None:
            return lora_o(x, read_lora_weights(self))
        return unfused(self, x, *args, **kwargs)
    return forward


def linear_replacement(module: nn.Module) -> Replacement | Keep:
    """One LoRA linear on ``lora_o``, or why it keeps peft's path."""
    why = lora_fast_path_reason(module, allow_bias=True)
    if why is not None:
        return Keep(why)
    unfused = unbound_forward(module)
    return Replacement(kernel="lora_o", forward=shared(("lora_o", unfused), lambda: _linear_forward(unfused)))


def _children(module: nn.Module, done: set) -> tuple[dict, list[str]]:
    """Single-linear replacements for the LoRA linears among ``module``'s children (declared
    projections or not: one LoRA linear on ``lora_o`` is always its own math), except ``done``."""
    children, reasons = {}, []
    for name, child in module.named_children():
        if name in done or not _is_lora(child):
            continue
        answer = linear_replacement(child)
        if isinstance(answer, Keep):
            reasons.append(f"{name}: {answer.reason}")
        else:
            children[name] = answer
    return children, reasons


def _weights(module: nn.Module, names, gate_up: bool):
    """``(gate, up, down)`` LoraWeights; a fused gate_up linear is split into two row windows."""
    lws = [read_lora_weights(getattr(module, n)) for n in names]
    if gate_up:
        gu, down = lws
        return (*gu.row_split(2), down)
    return lws


def _mlp_forward(names, gate_up: bool, activation: str, unfused, options: dict):
    mods = lambda self: [getattr(self, n) for n in names]  # noqa: E731

    def fused(self, x):
        return lora_mlp(x, *_weights(self, names, gate_up), activation=activation,
                        tile_rows=options.get("mlp_tile_rows"))

    def forward(self, x, *args, **kwargs):
        if not args and not kwargs and is_training_call(self, x) and group_reason(mods(self), names) is None:
            return fused(self, x)
        return unfused(self, x, *args, **kwargs)

    forward.fused = fused
    return forward


def mlp_replacement(arch, module: nn.Module, model: nn.Module) -> Replacement | Keep | None:
    """The MLP as one ``lora_mlp`` call (proven on a probe), else its linears one by one."""
    p = arch.projections
    gate_up = p.gate_up is not None
    names = (p.gate_up, p.down) if gate_up else (p.gate, p.up, p.down)
    why = linears(module, names) or single_input(module)
    if why is None and not all(_is_lora(getattr(module, n)) for n in names):
        why = f"not every projection of {names} carries a LoRA adapter"
    if why is None:
        why = group_reason([getattr(module, n) for n in names], names)
    if why is None and arch.numerics.mlp_activation not in ("swiglu", "geglu_tanh", "geglu"):
        why = f"activation {arch.numerics.mlp_activation!r} has no fused LoRA kernel"
    if why is None:
        options = _options(model)
        unfused, activation = unbound_forward(module), arch.numerics.mlp_activation
        # options by id: the forward keeps the model's options dict (read at call time) alive
        forward = shared(("lora_mlp", names, gate_up, activation, unfused, id(options)),
                         lambda: _mlp_forward(names, gate_up, activation, unfused, options))
        fused = forward.fused
        candidate = Replacement(kernel="lora_mlp", forward=forward)
        hidden = getattr(getattr(module, names[0]), "in_features")
        dtype, device = probe.compute_dtype(module, model), next(module.parameters()).device
        checked = probe.checked(arch, "lora_mlp", module, Replacement(kernel="lora_mlp", forward=fused),
                                lambda: (probe.randn(1, 3, hidden, dtype=dtype, device=device),),
                                hint=f"mlp_activation={arch.numerics.mlp_activation!r} and projections {names}")
        if isinstance(checked, Replacement):
            return candidate
        why = checked.reason
    children, reasons = _children(module, done=set())
    return _partial(children, [f"{type(module).__name__} not fused as one call: {why}"] + reasons)


def attention_replacement(arch, module: nn.Module, model: nn.Module) -> Replacement | Keep:
    """q/k/v as one ``lora_qkv`` call and the other projections as ``lora_o`` calls."""
    p = arch.projections
    names = tuple(n for n in (p.q, p.k, p.v) if n)
    reasons, children, done = [], {}, set()
    if names:
        mods = [getattr(module, n, None) for n in names]
        why = None if all(_is_lora(m) for m in mods) else f"not every one of {names} carries a LoRA adapter"
        why = why or group_reason(mods, names)
        if why is None:
            group = QKVGroup(mods, names)
            for n, m in zip(names, mods):
                unfused = unbound_forward(m)
                children[n] = Replacement(kernel="lora_qkv", attributes={"corept_qkv_group": group},
                                          forward=shared(("lora_qkv", unfused), lambda: _qkv_forward(unfused)))
            done.update(names)
        elif any(_is_lora(m) for m in mods):
            reasons.append(f"{'/'.join(names)} not grouped: {why}")
    more, why_not = _children(module, done)
    return _partial({**children, **more}, reasons + why_not)


def _qkv_forward(unfused):
    def forward(self, x, *args, **kwargs):
        if not args and not kwargs and is_training_call(self, x):
            out = self.corept_qkv_group.output(self, x)
            if out is not None:
                return out
        return unfused(self, x, *args, **kwargs)
    return forward


def _partial(children: dict, reasons: list[str]) -> Replacement | Keep:
    if not children:
        return Keep("; ".join(reasons) or "no LoRA linear here")
    kernel = next(iter(children.values())).kernel
    return Replacement(kernel=kernel, children=children, fallback_reason="; ".join(reasons) or None)


def _options(model: nn.Module) -> dict:
    state = state_of(model)
    return state.options if state is not None else {}


def lora_replacement(arch, module: nn.Module, model: nn.Module) -> Replacement | Keep:
    """The built-in answer of ``corept_patch_lora`` for an MLP, an attention module or a LoRA linear."""
    cls = type(module).__name__
    if is_param_wrapper(module):
        if type(wrapper_chain(module)[1]).__name__ in arch.roles.experts:
            return experts_lora_replacement(arch, module, model)
        return Keep(f"LoRA on the parameter {module.parameter_name} of {type(wrapper_chain(module)[1]).__name__}: "
                    f"only experts modules ({list(arch.roles.experts) or 'none declared'}) have a fused path")
    if _is_lora(module):
        return linear_replacement(module)
    if cls in arch.roles.mlp:
        return mlp_replacement(arch, module, model)
    if cls in arch.roles.attention:
        return attention_replacement(arch, module, model)
    return Keep(f"{cls} is neither an attention/MLP module of {arch.model_type} nor a peft LoRA linear")
