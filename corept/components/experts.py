"""Mixture-of-experts experts on grouped GEMMs (``corept_kernels.expert_linear``), LoRA included.

transformers 5 keeps a MoE layer's experts as stacked parameters in one module (``Qwen3MoeExperts``,
``GptOssExperts``, ...), called as ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])
-> [T, H]``. Its layout is marked by the attributes ``use_experts_implementation`` sets:
``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (``is_transposed``: ``[E, H, 2I]``
and ``[E, I, H]``), optional ``gate_up_proj_bias`` / ``down_proj_bias`` (``has_bias``), and the
class's ``_apply_gate`` (``[N, 2I] -> [N, I]``: the activation, concatenated or interleaved halves,
any clamp). The replaced forward, for the ``N = T * k`` routed rows:

1. sorts the rows by expert (a stable sort, so each expert's rows keep token order) and counts
   them into cumulative offsets, without a host sync;
2. runs ``gate_up``, the module's own gate, and ``down`` as two grouped GEMMs over those offsets,
   each with its LoRA branch when peft's ``target_parameters`` wraps the weight (never merging
   ``B @ A`` into a copy of the stacked weight, as peft's parametrization does);
3. scales each row by its routing weight and adds the rows back per token (``index_add_``, like
   transformers' loop). The router is untouched, so routing, its gradient and the load-balancing
   loss stay transformers'.

peft's LoRA on experts: ``lora.ParamWrapper`` modules, one per targeted parameter, nested around
the experts module. The outermost wrapper's forward is replaced; it reads each wrapper's factors
as ``A [E, r, in]`` and ``B [E, out, r]`` (:mod:`corept.lora.param_wrappers`). Adapters disabled or merged run the base GEMMs only; anything else peft's
wrapper can do and this cannot (several active adapters) keeps peft's forward for that call.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from corept_kernels import expert_linear, swiglu

from corept.components import experts_4bit as q4
from corept.components import probe
from corept.lora.param_wrappers import factors, wrapper_chain
from corept.patching.answers import Keep, Replacement
from corept.patching.sharing import shared
from corept.patching.signature import unbound_forward

WEIGHTS = ("gate_up_proj", "down_proj")
SILU_CLASSES = ("SiLU", "SiLUActivation")


def layout_reason(experts: nn.Module) -> str | None:
    """Why ``experts`` is not a stacked gate/up + down experts module this component serves, or ``None``."""
    cls = type(experts).__name__
    for name in WEIGHTS:
        w = getattr(experts, name, None)
        if not isinstance(w, torch.Tensor) or len(q4.logical_shape(w)) != 3:
            return f"{cls} has no stacked 3-D {name} parameter (experts as separate modules are not served)"
    if getattr(experts, "has_gate", True) is False:
        return f"{cls} has no gate (up projection only): no grouped kernel for it"
    if getattr(experts, "_is_expert_parallel", False):
        return f"{cls} is sharded by expert parallelism: its routing indices include a masked expert"
    if not callable(getattr(experts, "_apply_gate", None)):
        return f"{cls} has no _apply_gate (transformers' use_experts_implementation layout attributes)"
    if getattr(experts, "has_post_expert_norm", False):
        return f"{cls} normalizes each expert's output: not served"
    return None


def _gate(experts: nn.Module):
    """``fn(gate_up [N, 2I]) -> [N, I]``: corept's SwiGLU kernel for transformers' default gate with
    SiLU (concatenated halves, gate first), else the module's own ``_apply_gate``."""
    fn = getattr(type(experts), "_apply_gate", None)
    default = getattr(fn, "__qualname__", "") == "_default_apply_gate"
    # torch's nn.SiLU or transformers' ACT2FN["silu"] (SiLUActivation, no nn.SiLU subclass); the
    # patch-time probe checks the choice against the module's own gate
    if default and type(getattr(experts, "act_fn", None)).__name__ in SILU_CLASSES:
        return lambda gate_up: swiglu(*gate_up.chunk(2, dim=-1))
    return experts._apply_gate


def run_experts(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                lora: dict | None = None) -> torch.Tensor:
    """The experts' output ``[T, H]`` for ``hidden [T, H]`` routed by ``top_k_index`` / ``top_k_weights``
    ``[T, k]``; ``lora``: ``{weight name: (A [E, r, in], B [E, out, r], scaling)}``."""
    num_experts = q4.logical_shape(experts.gate_up_proj)[0]
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = counts.cumsum(0).to(torch.int32)
    transposed = bool(getattr(experts, "is_transposed", False))
    has_bias = bool(getattr(experts, "has_bias", False))
    lora = lora or {}

    def linear(x, name):
        a, b, s = lora.get(name, (None, None, 1.0))
        bias = getattr(experts, f"{name}_bias") if has_bias else None
        w = getattr(experts, name)  # a 4-bit weight is dequantized per call, and again in the backward
        return expert_linear(x, offsets, w, a, b, s, bias=bias, transposed=transposed,
                             dequantize=q4.dequantize if q4.is_4bit(w) else None)

    rows = linear(hidden[token], "gate_up_proj")
    rows = linear(_gate(experts)(rows), "down_proj")
    rows = rows * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    return torch.zeros_like(hidden).index_add_(0, token, rows.to(hidden.dtype))


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    return run_experts(self, hidden_states, top_k_index, top_k_weights)


def probe_inputs(experts: nn.Module, dtype, device) -> tuple:
    """``(hidden [5, H], top_k_index [5, k], top_k_weights [5, k])``: distinct experts per token,
    positive weights; ``k = min(2, E)``."""
    shape = q4.logical_shape(experts.gate_up_proj)
    num_experts = shape[0]
    hidden_size = shape[1] if getattr(experts, "is_transposed", False) else shape[2]
    k = min(2, num_experts)
    g = probe.generator(device)
    index = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(5)]).to(device)
    weights = torch.rand(5, k, generator=g).to(device=device, dtype=dtype) + 0.1
    return probe.randn(5, hidden_size, dtype=dtype, device=device), index, weights


def experts_replacement(arch, module: nn.Module, model: nn.Module) -> Replacement | Keep:
    """The experts' forward on grouped GEMMs, proven against the module's own on a probe."""
    why = layout_reason(module)
    if why:
        return Keep(why)
    replacement = Replacement(kernel="expert_linear", forward=_experts_forward)
    dtype, device = _compute_dtype(module, model), module.gate_up_proj.device
    with q4.dense_during(module):  # transformers' forward reads 16-bit weights
        return probe.checked(arch, "experts", module, replacement, lambda: probe_inputs(module, dtype, device),
                             hint="experts layout (is_transposed, has_bias, _apply_gate)")


def _compute_dtype(experts: nn.Module, model: nn.Module) -> torch.dtype:
    return q4.compute_dtype(experts) or probe.compute_dtype(experts, model)


# ----------------------------------------------------------------------------- LoRA (peft target_parameters)


def active_lora(chain: list) -> dict | None:
    """``{weight name: factors}`` for the wrappers' one active adapter; ``{}`` when the adapters are
    disabled or merged (the base weights alone compute peft's output); ``None`` when only peft's
    forward can serve the call."""
    out = {}
    for w in chain:
        if w.disable_adapters:
            if w.merged:
                return None  # peft unmerges first
            continue
        if w.merged:
            continue
        active = [a for a in w.active_adapters if a in w.lora_A]
        if len(active) > 1:
            return None
        if active:
            out[w.parameter_name] = factors(w, active[0])
    return out


def _lora_forward(unwrapped):
    def forward(self, hidden_states, *args, **kwargs):
        chain, experts = wrapper_chain(self)
        lora = active_lora(chain)
        if lora is None or kwargs or len(args) != 2:
            return unwrapped(self, hidden_states, *args, **kwargs)
        return run_experts(experts, hidden_states, *args, lora=lora)
    return forward


def chain_reason(outer: nn.Module) -> str | None:
    chain, experts = wrapper_chain(outer)
    why = layout_reason(experts)
    if why:
        return why
    names = [w.parameter_name for w in chain]
    if set(names) - set(WEIGHTS) or len(set(names)) != len(names):
        return f"LoRA on experts parameters {names}: corept serves {list(WEIGHTS)} once each"
    if any(getattr(w, "use_dora", {}).get(a) for w in chain for a in w.lora_A):
        return "DoRA on experts"
    return None


def experts_lora_replacement(arch, module: nn.Module, model: nn.Module) -> Replacement | Keep:
    """The outermost ``ParamWrapper`` around an experts module: its LoRA experts on grouped GEMMs
    (proven against peft's forward on a probe)."""
    why = chain_reason(module)
    if why:
        return Keep(why)
    unwrapped = unbound_forward(module)
    forward = shared(("lora_experts", unwrapped), lambda: _lora_forward(unwrapped))
    replacement = Replacement(kernel="expert_linear", forward=forward)
    experts = wrapper_chain(module)[1]
    dtype, device = _compute_dtype(experts, model), experts.gate_up_proj.device
    # peft's forward parametrizes the weights and removes the parametrization afterwards, which
    # re-registers them last: the probe must not reorder the model's state_dict
    order = list(experts._parameters.items())
    try:
        with q4.dense_during(experts):  # peft's forward adds B @ A to 16-bit weights
            return probe.checked(arch, "lora_experts", module, replacement,
                                 lambda: probe_inputs(experts, dtype, device),
                                 hint="experts layout and peft's LoRA factor layout")
    finally:
        experts._parameters.clear()
        experts._parameters.update(order)
