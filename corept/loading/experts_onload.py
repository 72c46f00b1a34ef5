"""4-bit loads of mixture-of-experts models without the 16-bit experts on the GPU.

bitsandbytes quantizes ``nn.Linear`` while transformers loads, but a MoE model's stacked experts
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``: most of its weights) are plain parameters, so
a 4-bit load would first place them on the GPU in 16 bits (gpt-oss-20b: 38 GB) and corept could
quantize them only afterwards: the load alone would not fit the card QLoRA is meant for.

Instead, :func:`experts_device_map` hands transformers a device map that keeps every experts module
on the CPU (bitsandbytes' ``llm_int8_enable_fp32_cpu_offload`` allows that; the experts are not
``nn.Linear``, so nothing is upcast) and the rest on the GPU. accelerate then leaves those modules'
parameters on the meta device, their values held on the CPU by the module's offload hook.
:func:`onload_experts` moves them to the GPU one module at a time, quantizing the stacked weights
to NF4 on the way (:mod:`corept.components.experts_4bit`), and removes every dispatch hook, so the
model is an ordinary single-GPU model again. GPU memory during the load: the 4-bit model plus one
experts module in 16 bits. Host memory: the 16-bit experts (page cache when the checkpoint is
already in that dtype).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

logger = logging.getLogger("corept")


def experts_device_map(meta_model: nn.Module, classes, device) -> dict | None:
    """``{module or parameter name: device}`` covering every parameter and buffer of ``meta_model``
    once: experts modules (class names in ``classes``) on ``"cpu"``, everything else on ``device``.
    ``None`` when the model has no experts module.

    No ``""`` key: accelerate would then place every submodule, the experts included, on ``device``.
    """
    classes = set(classes)
    if not any(type(m).__name__ in classes for m in meta_model.modules()):
        return None
    out: dict = {}

    def walk(prefix: str, module: nn.Module) -> None:
        if type(module).__name__ in classes:
            out[prefix] = "cpu"
            return
        if prefix and not any(type(m).__name__ in classes for m in module.modules()):
            out[prefix] = device
            return
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            out[f"{prefix}.{name}" if prefix else name] = device
        for name, child in module.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", meta_model)
    return out


def onload_experts(model: nn.Module, classes, device, *, quantize: bool) -> int:
    """Move the experts modules accelerate offloaded (``classes``) onto ``device``, one at a time,
    stacked weights quantized to NF4 when ``quantize``; then remove every dispatch hook and record
    the model as placed on ``device``. Returns how many experts modules were moved."""
    from accelerate.hooks import remove_hook_from_module, remove_hook_from_submodules
    from accelerate.utils import set_module_tensor_to_device

    from corept.components.experts_4bit import WEIGHTS, quantize_weight

    classes, moved = set(classes), 0
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if type(module).__name__ not in classes or hook is None or not getattr(hook, "offload", False):
            continue
        names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        values = {n: hook.weights_map[n] for n in names}
        remove_hook_from_module(module, recurse=True)
        for name in names:
            value = values.pop(name)
            if quantize and name in WEIGHTS and value.dim() == 3 and value.is_floating_point():
                module._parameters[name] = quantize_weight(value.to(device))
            else:
                set_module_tensor_to_device(module, name, device, value=value)
            del value
        moved += 1
    remove_hook_from_submodules(model)
    remove_hook_from_module(model)
    if getattr(model, "hf_device_map", None) is not None:
        model.hf_device_map = {"": device}  # Trainer refuses 4-bit models with CPU entries in the map
    if moved:
        logger.info("corept: %d experts modules moved to %s one at a time%s", moved, device,
                    ", stacked weights quantized to NF4 on the way" if quantize else "")
    return moved
