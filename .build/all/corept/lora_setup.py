"""``corept.get_peft_model``: LoRA/QLoRA through peft, with corept's fused LoRA kernels swapped in.

peft builds the adapters; corept then (1) prepares quantized models without upcasting the frozen
weights to fp32 (peft's ``prepare_model_for_kbit_training`` does, costing GBs on 8B models),
(2) turns on gradient checkpointing (``"corept"``: inputs offloaded to pinned CPU memory), and
(3) replaces, per instance, the forward of every gated MLP whose three projections take the fused
path with ``corept_kernels.lora_mlp``, and of every other LoRA linear with ``lora_o`` (one linear,
fewer saved activations). Layers that cannot take the fast path (dropout, bias, DoRA...) keep
peft's forward; the report says why.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn as nn
from corept_kernels import lora_mlp, lora_o
from corept_kernels.lora import lora_fast_path_reason, lora_weights_from_peft

from corept.checkpointing import enable_checkpointing
from corept.components._device import implementation
from corept.errors import InvalidOptionsError
from corept.patching import apply_extra, report, state_holder
from corept.patching import patch as patch_model
from corept.patching import resolve_architecture
from corept.replacement import Replacement

logger = logging.getLogger("corept")
_PROJ = ("gate_proj", "up_proj", "down_proj")


def _validate(r, lora_alpha, lora_dropout, bias, target_modules) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidOptionsError(f"r must be a positive int, got {r!r}")
    if not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise InvalidOptionsError(f"lora_alpha must be positive, got {lora_alpha!r}")
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise InvalidOptionsError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if bias not in ("none", "all", "lora_only"):
        raise InvalidOptionsError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    if not (target_modules == "all-linear" or (isinstance(target_modules, (list, tuple)) and target_modules
                                                and all(isinstance(t, str) for t in target_modules))):
        raise InvalidOptionsError(f"target_modules must be 'all-linear' or a non-empty list of module names, "
                                  f"got {target_modules!r}")


def prepare_quantized(model: nn.Module) -> None:
    """Freeze every weight of a k-bit model for adapter training, keeping their dtypes."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()


def _is_training_call(layer: nn.Module) -> bool:
    return layer.training and torch.is_grad_enabled()


def _fused_mlp_forward(activation: str):
    def forward(self, x, *args, **kwargs):
        projs = [getattr(self, p) for p in _PROJ]
        if _is_training_call(self) and all(lora_fast_path_reason(p) is None for p in projs):
            return lora_mlp(x, *(lora_weights_from_peft(p) for p in projs), activation=activation)
        return self.corept_unfused_forward(x, *args, **kwargs)
    return forward


def _fused_linear_forward(self, x, *args, **kwargs):
    if _is_training_call(self) and lora_fast_path_reason(self) is None:
        return lora_o(x, lora_weights_from_peft(self))
    return self.corept_unfused_forward(x, *args, **kwargs)


def install_fused_lora(model: nn.Module, activation: str, mlp_classes: Iterable[str]) -> tuple[int, int, dict]:
    """Swap fused LoRA forwards into the MLPs and LoRA linears of a patched peft model.

    :returns: ``(mlps fused, linears fused, {module name: reason it kept peft's path})``.
    """
    mlp_classes = set(mlp_classes)
    pairs, reasons, in_fused_mlp = [], {}, set()
    mlp_impl, _ = implementation("lora_mlp", model)
    linear_impl, _ = implementation("lora_o", model)
    for name, m in model.named_modules():
        if type(m).__name__ in mlp_classes and all(hasattr(m, p) for p in _PROJ):
            why = [lora_fast_path_reason(getattr(m, p)) for p in _PROJ]
            if all(w is None for w in why):
                unfused = m.forward
                pairs.append((m, Replacement(mlp_impl, forward=_fused_mlp_forward(activation),
                                             attributes={"corept_unfused_forward": unfused})))
                in_fused_mlp.update(id(getattr(m, p)) for p in _PROJ)
    n_mlp = len(pairs)
    for name, m in model.named_modules():
        if not hasattr(m, "lora_A") or id(m) in in_fused_mlp:
            continue
        why = lora_fast_path_reason(m)
        if why is not None:
            reasons[name] = why
            continue
        pairs.append((m, Replacement(linear_impl, forward=_fused_linear_forward,
                                     attributes={"corept_unfused_forward": m.forward})))
    fallback = None
    if reasons:
        first = next(iter(reasons.items()))
        fallback = f"{len(reasons)} LoRA layer(s) keep peft's path, e.g. {first[0]}: {first[1]}"
    apply_extra(model, "lora", pairs, fallback)
    return n_mlp, len(pairs) - n_mlp, reasons


def get_peft_model(model: nn.Module, r: int = 16, lora_alpha: float = 16, lora_dropout: float = 0.0,
                   target_modules="all-linear", bias: str = "none", use_gradient_checkpointing="corept",
                   use_rslora: bool = False, loftq_config=None, modules_to_save=None, random_state: int = 3407,
                   **lora_kwargs):
    """Add LoRA adapters to a (corept-loaded) model and return the ``PeftModel``.

    :param r: adapter rank. :param lora_alpha: scaling numerator (scaling = alpha / r, or
        alpha / sqrt(r) with ``use_rslora``). :param lora_dropout: 0 keeps the fused fast path.
    :param target_modules: ``"all-linear"`` (the architecture's declared LoRA targets, else peft's
        all-linear) or a list of module names.
    :param use_gradient_checkpointing: ``"corept"`` (offloaded), ``True`` (standard) or ``False``.
    :param random_state: seed for the adapter initialisation.
    """
    from peft import LoraConfig
    from peft import get_peft_model as peft_get_peft_model

    _validate(r, lora_alpha, lora_dropout, bias, target_modules)
    opts = getattr(model, "corept_load_options", None)
    if opts is not None and opts.full_finetuning:
        raise InvalidOptionsError("this model was loaded with full_finetuning=True: train it directly, or reload "
                                  "without full_finetuning to add LoRA adapters.")
    if hasattr(model, "peft_config"):
        raise InvalidOptionsError("model already has peft adapters; call get_peft_model on the base model once.")
    found = resolve_architecture(model.config.model_type, strict=False)
    targets = target_modules
    if target_modules == "all-linear" and found is not None and found[0].lora_targets:
        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or hasattr(m, "quant_state") or type(m).__name__.startswith("Linear")}
        targets = [t for t in found[0].lora_targets if t in present] or "all-linear"
    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    if quantized:
        prepare_quantized(model)
    torch.manual_seed(random_state)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, bias=bias,
                        use_rslora=use_rslora, loftq_config=loftq_config or {}, modules_to_save=modules_to_save,
                        task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = peft_get_peft_model(model, config)
    ck = enable_checkpointing(peft_model, use_gradient_checkpointing)
    if state_holder(peft_model) is None and found is not None:
        patch_model(peft_model)
    if state_holder(peft_model) is not None and found is not None:
        arch = found[0]
        quirks = arch.quirks.resolve(model.config.get_text_config())
        n_mlp, n_lin, reasons = install_fused_lora(peft_model, quirks.mlp_activation, arch.roles.mlp)
        logger.info("corept: fused LoRA on %d MLP(s) and %d linear(s); %d layer(s) on peft's path", n_mlp, n_lin,
                    len(reasons))
        rep = report(peft_model)
        rep.applied["checkpointing"] = ck
    return peft_model
