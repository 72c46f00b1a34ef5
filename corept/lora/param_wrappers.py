"""peft's LoRA on parameters (``lora.ParamWrapper``, ``LoraConfig(target_parameters=...)``).

peft wraps a module once per targeted parameter, the wrappers nested around the module that owns
the parameters (a mixture-of-experts layer's stacked experts). Its factors of a 3-D parameter with
``E`` experts are ``lora_A.weight`` ``[E*r, in]`` (rows expert-major) and ``lora_B.weight``
``[out, r*E]`` (columns expert-minor), ``in``/``out`` as the weight is applied (``x [., in] ->
[., out]``) whichever way the parameter is stored. Read here once, for the forward
(:mod:`corept.components.experts`), merged saving and the conformance kit.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def is_param_wrapper(module: nn.Module) -> bool:
    """A peft ``lora.ParamWrapper`` (LoRA on a parameter, nested one per targeted parameter)."""
    return hasattr(module, "parameter_name") and hasattr(module, "lora_A") and hasattr(module, "base_layer")


def wrapper_chain(outer: nn.Module) -> tuple[list, nn.Module]:
    """``(wrappers outermost first, the wrapped module)``; ``([], outer)`` for a module peft did not wrap."""
    chain, m = [], outer
    while is_param_wrapper(m):
        chain.append(m)
        m = m.base_layer
    return chain, m


def factors(wrapper: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [E, r, in], B [E, out, r], scaling)`` of ``wrapper``'s ``adapter`` (views of peft's weights)."""
    e = wrapper.num_experts
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    return a.reshape(e, -1, a.shape[-1]), b.reshape(b.shape[0], -1, e).permute(2, 0, 1), wrapper.scaling[adapter]
