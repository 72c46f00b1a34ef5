"""One causal-LM forward for every architecture: fused linear cross-entropy when training.

When labels are given while training with gradients enabled, the loss is computed from the final
hidden states and the ``lm_head`` weight by ``corept_kernels.fused_linear_cross_entropy`` without
materializing the ``[tokens, vocab]`` logits, and ``logits`` is ``None`` in the output. Otherwise
(eval, generation, or a head corept cannot fuse) it computes logits exactly like transformers
(``logits_to_keep``, final-logit softcap) and the model's own ``loss_function``.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from corept_kernels import fused_linear_cross_entropy
from transformers.modeling_outputs import CausalLMOutputWithPast

from corept.architecture import Architecture, Quirks
from corept.components._device import implementation
from corept.replacement import Replacement

_OUTPUT_FIELDS = [f.name for f in dataclasses.fields(CausalLMOutputWithPast) if f.name not in ("loss", "logits")]


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def _keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    return hidden[:, logits_to_keep, :]


def _shifted(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_replacement(arch: Architecture, quirks: Quirks, module: nn.Module, model: nn.Module) -> Replacement | None:
    """Replace a ``*ForCausalLM`` forward; the module needs ``base_model_prefix`` and an output embedding."""
    prefix = getattr(module, "base_model_prefix", None)
    if not prefix or not isinstance(getattr(module, prefix, None), nn.Module):
        return None
    if not isinstance(module.get_output_embeddings(), nn.Module):
        return None
    softcap = quirks.final_logit_softcap
    impl, reason = implementation("fused_linear_cross_entropy", model)

    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        return_dict = kwargs.pop("return_dict", None)
        shift_labels = kwargs.pop("shift_labels", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        outputs = getattr(self, prefix)(input_ids=input_ids, return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        head = self.get_output_embeddings()
        wants_loss = labels is not None or shift_labels is not None
        fusable = (type(head) is nn.Linear and self.training and torch.is_grad_enabled()
                   and not getattr(self, "corept_return_logits", False))
        loss = logits = None
        if wants_loss and fusable:
            targets = _shifted(labels, shift_labels, ignore_index).to(hidden.device)
            loss = fused_linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), bias=head.bias,
                ignore_index=ignore_index, softcap=softcap,
                num_items_in_batch=kwargs.get("num_items_in_batch"))
        else:
            logits = _softcap(head(_keep(hidden, logits_to_keep)), softcap)
            if wants_loss:
                loss = self.loss_function(logits, labels, self.config.get_text_config().vocab_size,
                                          shift_labels=shift_labels, ignore_index=ignore_index, **kwargs)
        extra = {name: getattr(outputs, name, None) for name in _OUTPUT_FIELDS}
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **extra)
        return out.to_tuple() if return_dict is False else out

    return Replacement(implementation=impl, forward=forward, fallback_reason=reason)
