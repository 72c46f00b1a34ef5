"""One causal-LM forward for every architecture: fused linear cross-entropy when training.

When labels are given while training with gradients enabled, the loss is computed from the final
hidden states and the ``lm_head`` weight by ``corept_kernels.fused_linear_cross_entropy`` without
materializing the ``[tokens, vocab]`` logits, and ``logits`` is ``None`` in the output. Otherwise
(eval, generation, or a head corept cannot fuse) it computes logits exactly like transformers
(``logits_to_keep``, final-logit softcap) and the model's own ``loss_function``.

Sharded heads (FSDP2, or any engine that gathers a module's weights in its forward hooks): the
fused loss is computed *inside a call of the head module* (:func:`through_head`), so the engine's
pre-forward hook has replaced the local shard by the gathered ``[V, H]`` weight before the kernel
reads it, and its backward hooks reduce the weight gradient as for any other module. A head whose
weight is still not a plain ``[V, H]`` tensor there (e.g. a DTensor under tensor parallelism)
falls back to the head's own forward and transformers' loss.
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


def _plain_linear(head: nn.Module) -> bool:
    """An ``nn.Linear`` (or an engine's subclass of it, e.g. FSDP2's ``FSDPLinear``) with Linear's forward."""
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward


def _gathered(weight, head: nn.Linear) -> bool:
    """``weight`` is a plain (not DTensor) tensor of the head's full ``[out_features, in_features]`` shape."""
    return (type(weight) in (torch.Tensor, nn.Parameter)
            and tuple(weight.shape) == (head.out_features, head.in_features))


_NOT_FUSED = object()


def through_head(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, **loss_kwargs):
    """``fused_linear_cross_entropy(hidden, head.weight, targets)`` computed inside ``head(...)``.

    :param hidden: ``[N, H]`` final hidden states. :param targets: ``[N]`` shifted labels.
    :returns: the scalar loss, or ``None`` when the weight seen inside the call is not the gathered
        ``[V, H]`` tensor (the caller then uses the head's own forward).

    The head's ``forward`` is replaced on the instance for the duration of this one call only
    (and restored, with any previous instance attribute, even on error), so the forward hooks of
    a distributed engine run around the kernel exactly as they would around ``head(hidden)``.
    Forward hooks of the head therefore see the loss as the output of this call, not logits.
    """
    previous = head.__dict__.get("forward", _NOT_FUSED)

    def fused(h, t):
        weight, bias = head.weight, head.bias
        if not _gathered(weight, head) or weight.device != h.device:
            return None
        return fused_linear_cross_entropy(h, weight, t, bias=bias, **loss_kwargs)

    head.forward = fused
    try:
        return head(hidden, targets)
    finally:
        if previous is _NOT_FUSED:
            del head.forward
        else:
            head.forward = previous


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
        fusable = (_plain_linear(head) and self.training and torch.is_grad_enabled()
                   and not getattr(self, "corept_return_logits", False))
        loss = logits = None
        if wants_loss and fusable:
            targets = _shifted(labels, shift_labels, ignore_index).to(hidden.device)
            loss = through_head(head, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1),
                                ignore_index=ignore_index, softcap=softcap,
                                num_items_in_batch=kwargs.get("num_items_in_batch"))
        if loss is None:
            logits = _softcap(head(_keep(hidden, logits_to_keep)), softcap)
            if wants_loss:
                loss = self.loss_function(logits, labels, self.config.get_text_config().vocab_size,
                                          shift_labels=shift_labels, ignore_index=ignore_index, **kwargs)
        extra = {name: getattr(outputs, name, None) for name in _OUTPUT_FIELDS}
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **extra)
        return out.to_tuple() if return_dict is False else out

    return Replacement(implementation=impl, forward=forward, fallback_reason=reason)
