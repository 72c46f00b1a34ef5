"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for corept models: one unit per decoder layer.

Call :func:`shard` after ``corept.load`` (patches) and ``corept.get_peft_model`` (adapters,
checkpointing): corept's replacements are instance forwards, so they survive ``fully_shard``
(which swaps the module's class, not its instance attributes), and FSDP2's forward hooks gather a
unit's shards before a patched forward reads them. The fused loss reads the gathered ``lm_head``
weight wherever the head lives (root unit, its own unit or a ``[norm, lm_head]`` group):
``corept.components.loss.through_head`` runs it inside the head's own call.

Requirements that FSDP2 puts on the model (checked by :func:`check_shardable`):

* trainable parameters of one unit share a dtype (LoRA: fp32 adapters; full fine-tuning: the
  load dtype);
* 4-bit bases need ``bnb_4bit_quant_storage`` set to a float dtype
  (``corept.load(..., load_in_4bit=True, bnb_4bit_quant_storage="auto")``): packed ``uint8``
  weights would be converted to DTensors that lose bitsandbytes' ``quant_state``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from corept.errors import InvalidOptionsError

HEAD_PLACEMENTS = ("root", "own", "tail")


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def layer_class_names(model: nn.Module) -> set[str]:
    """Decoder-layer class names: the ``decoder_layer`` role of the architecture resolved when the
    model was patched, else transformers' ``_no_split_modules``."""
    from corept.patching import architecture_of

    lm = _causal_lm(model)
    arch = architecture_of(model)
    names = set(arch.roles.decoder_layer) if arch is not None else set()
    return names or set(getattr(lm, "_no_split_modules", None) or ())


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of ``model`` (peft-wrapped or not), in order."""
    names = layer_class_names(model)
    layers = [m for m in _causal_lm(model).modules() if type(m).__name__ in names]
    if not layers:
        raise InvalidOptionsError(f"no decoder layer found to shard (looked for {sorted(names) or 'nothing'})")
    return layers


def check_shardable(model: nn.Module) -> None:
    """Raise :class:`InvalidOptionsError` for parameters FSDP2 cannot shard correctly."""
    packed = [n for n, p in model.named_parameters()
              if type(p).__name__ == "Params4bit" and not p.is_floating_point()]
    if packed:
        raise InvalidOptionsError(
            f"{len(packed)} 4-bit weight(s) are stored as {model.get_parameter(packed[0]).dtype} (e.g. {packed[0]}); "
            f"FSDP needs them in a float storage: corept.load(..., load_in_4bit=True, bnb_4bit_quant_storage='auto')")


def _final_norm(lm: nn.Module) -> nn.Module | None:
    backbone = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    norm = getattr(backbone, "norm", None)
    return norm if isinstance(norm, nn.Module) else None


def shard(model: nn.Module, *, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
          head: str = "root", offload_policy=None) -> nn.Module:
    """``fully_shard`` every decoder layer, optionally the head, then the root; returns ``model``.

    :param mesh: a 1-D ``DeviceMesh`` (default: every rank of the default process group, on this
        rank's GPU ``LOCAL_RANK``, made the current device). Units still on CPU are moved to the
        mesh's device as they are sharded, so a CPU-loaded model never sits whole on one GPU.
    :param mp_policy: ``torch.distributed.fsdp.MixedPrecisionPolicy`` (default: none; corept
        models already compute in their load dtype).
    :param head: where ``lm_head`` lives: ``"root"`` (with the embedding and final norm in the
        root unit, gathered for the whole step), ``"own"`` (its own unit, resharded after
        forward) or ``"tail"`` (one unit with the final norm, kept gathered from forward to
        backward, as accelerate's FSDP2 plugin does). Tied embeddings always stay in the root.
    """
    from torch.distributed.fsdp import fully_shard

    if head not in HEAD_PLACEMENTS:
        raise InvalidOptionsError(f"head must be one of {HEAD_PLACEMENTS}, got {head!r}")
    check_shardable(model)
    if mesh is None and torch.cuda.is_available():
        from corept.distributed.launcher import use_local_device

        use_local_device()  # fully_shard's default mesh (and where it moves each unit) is the current GPU
    kw = {"mesh": mesh}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    if offload_policy is not None:
        kw["offload_policy"] = offload_policy
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    lm = _causal_lm(model)
    lm_head, embed = lm.get_output_embeddings(), lm.get_input_embeddings()
    tied = lm_head is not None and embed is not None and lm_head.weight is embed.weight
    if head == "own" and not tied:
        fully_shard(lm_head, reshard_after_forward=reshard_after_forward, **kw)
    elif head == "tail" and not tied:
        norm = _final_norm(lm)
        fully_shard([m for m in (norm, lm_head) if m is not None], reshard_after_forward=False, **kw)
    fully_shard(model, **kw)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 or tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensors(model: nn.Module, *, trainable_only: bool = True, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """Gather parameters of a sharded model to full tensors (a collective: every rank must call it).

    :returns: ``{name: tensor}`` with the names of ``model.named_parameters()``; every rank gets
        the full values (adapters are small; for a whole model prefer
        ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with ``full_state_dict``).
    """
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        t = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
        out[name] = t.cpu() if to_cpu else t
    return out


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered gradients of the trainable parameters (collective; ``None`` grads are skipped)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().cpu()
    return out
