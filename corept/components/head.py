"""The causal-LM head: fused linear cross-entropy when training, transformers' own forward otherwise.

The replacement keeps the ``*ForCausalLM`` forward's signature and, for every call it cannot fuse
(eval, generation, no labels, ``logits_to_keep``, logits asked for), runs that forward itself. A
training call with labels runs the backbone and computes the loss from the final hidden states and
the ``lm_head`` weight (``corept_kernels.fused_linear_cross_entropy``) without materializing the
``[tokens, vocab]`` logits; ``logits`` is then ``None``.

The fused path reproduces the head-side math the plugin declares (``Numerics.logit_scale``,
``final_logit_softcap``). Before installing it, a probe runs the original forward on given hidden
states (the backbone stubbed for that one call) and compares its logits and loss with the declared
math: a forward doing anything else (another scale, a softcap, a z-loss, another loss function)
keeps transformers' forward, with the reason.

Plugins writing their own loss hook can use :func:`fused_loss` (shift labels, the FSDP2-safe head
call, ``num_items_in_batch``) and :func:`through_head`.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from corept_kernels import fused_linear_cross_entropy
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from corept.components import probe
from corept.patching.answers import Keep, Replacement
from corept.patching.signature import forward_signature, unbound_forward

#: output fields a backbone returns that a plain causal-LM head passes through unchanged (the
#: installed transformers' names: the cache field was renamed in 5.x); any other non-None field
#: may feed head-side math corept does not know, so such a call runs the original head on the
#: backbone's outputs. One is known: MoE router logits with the head's ``router_aux_loss_coef``
#: (the fused loss plus that coefficient times the aux loss the original head computes without labels).
PASS_THROUGH = ("last_hidden_state",) + tuple(f.name for f in dataclasses.fields(CausalLMOutputWithPast)
                                              if f.name not in ("loss", "logits"))
#: arguments the head consumes itself (never passed to the backbone by the fused path)
HEAD_ARGUMENTS = ("labels", "logits_to_keep", "return_dict", "shift_labels", "ignore_index")


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``[B, S]`` labels shifted left by one (the target of position ``t`` is token ``t + 1``), the
    last position ``ignore_index``: what transformers' causal-LM loss does."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _plain_linear(head: nn.Module) -> bool:
    """An ``nn.Linear`` (or an engine's subclass of it, e.g. FSDP2's ``FSDPLinear``) with Linear's forward."""
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward


def _gathered(weight, head: nn.Linear) -> bool:
    """``weight`` is a plain (not DTensor) tensor of the head's full ``[out_features, in_features]`` shape."""
    return type(weight) in (torch.Tensor, nn.Parameter) and tuple(weight.shape) == (head.out_features, head.in_features)


_NOT_SET = object()


def through_head(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, **loss_kwargs):
    """``fused_linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, **loss_kwargs)``
    computed inside ``head(...)``, so a distributed engine's hooks (FSDP2, ZeRO-3) gather the weight
    first and reduce its gradient after, as for any module call.

    :param hidden: ``[N, H]`` final hidden states. :param targets: ``[N]`` shifted labels.
    :returns: the scalar loss, or ``None`` when the weight seen inside the call is not the gathered
        ``[V, H]`` tensor (a DTensor under tensor parallelism): use the head's own forward then.
    """
    previous = head.__dict__.get("forward", _NOT_SET)

    def fused(h, t):
        weight = head.weight
        if not _gathered(weight, head) or weight.device != h.device:
            return None
        return fused_linear_cross_entropy(h, weight, t, bias=head.bias, **loss_kwargs)

    head.forward = fused
    try:
        return head(hidden, targets)
    finally:
        if previous is _NOT_SET:
            del head.forward
        else:
            head.forward = previous


def fused_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None = None, *,
               shift_labels_: torch.Tensor | None = None, ignore_index: int = -100, num_items_in_batch=None,
               logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor | None:
    """The causal-LM loss of ``hidden`` ``[B, S, H]`` without logits, or ``None`` when ``head`` is
    not a plain linear whose full weight is at hand (compute logits then).

    :param labels: ``[B, S]`` unshifted labels, or :param shift_labels_: already shifted ones.
    :param num_items_in_batch: the Trainer's token count (sum reduction divided by it).
    """
    if not _plain_linear(head):
        return None
    targets = shift_labels_ if shift_labels_ is not None else shift_labels(labels, ignore_index)
    return through_head(head, hidden.reshape(-1, hidden.shape[-1]), targets.to(hidden.device).reshape(-1),
                        ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale,
                        num_items_in_batch=num_items_in_batch)


@contextlib.contextmanager
def backbone_returning(backbone: nn.Module, outputs):
    """For the duration, calling ``backbone`` returns ``outputs`` (its hooks still run)."""
    previous = backbone.__dict__.get("forward", _NOT_SET)
    backbone.forward = lambda *args, **kwargs: outputs
    try:
        yield
    finally:
        if previous is _NOT_SET:
            del backbone.forward
        else:
            backbone.forward = previous


class _ProbeOutput(BaseModelOutputWithPast):
    """The stub backbone's output: given hidden states, ``None`` for any other field a head reads
    (e.g. an MoE head's ``router_logits``)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def _declared_logits(head: nn.Module, hidden: torch.Tensor, numerics) -> torch.Tensor:
    logits = head(hidden)
    if numerics.logit_scale != 1.0:
        logits = logits * numerics.logit_scale
    if numerics.final_logit_softcap is not None:
        logits = torch.tanh(logits / numerics.final_logit_softcap) * numerics.final_logit_softcap
    return logits


def prove_head(module: nn.Module, backbone: nn.Module, head: nn.Module, original, numerics):
    """``(reason or None, output class)``: the original forward's logits and loss on probe hidden
    states against the declared head math and cross-entropy."""
    weight = head.weight
    hidden_size, vocab = weight.shape[1], weight.shape[0]
    h = probe.randn(1, 5, hidden_size, dtype=weight.dtype, device=weight.device)
    with torch.no_grad(), probe.eval_mode(module):
        plain = head(h).float()
        h = h * (50.0 / max(plain.std().item(), 1e-6))  # logits of std ~50: a softcap's tanh bends
        labels = torch.randint(0, vocab, (1, 5), generator=probe.generator(None)).to(weight.device)
        ids = torch.zeros(1, 5, dtype=torch.long, device=weight.device)
        # an MoE head's aux loss needs router logits the stub does not have: the probe checks the
        # logits and the cross-entropy, the aux term is added by the replacement as the head adds it
        extra = {"output_router_logits": False} if "output_router_logits" in forward_signature(module).parameters else {}
        try:
            with backbone_returning(backbone, _ProbeOutput(last_hidden_state=h)):
                out = original(module, input_ids=ids, labels=labels, return_dict=True, **extra)
        except Exception as exc:  # noqa: BLE001 - any failure is a reason not to replace
            return f"the loss probe could not run {type(module).__name__}.forward ({type(exc).__name__}: {exc})", None
        want = _declared_logits(head, h, numerics)
        err = probe.scaled_error(want, out.logits) if out.logits is not None else float("inf")
        tol = probe.tolerance(weight.dtype)
        if err > tol:
            return (f"{type(module).__name__}.forward computes other logits than lm_head with logit_scale="
                    f"{numerics.logit_scale:g}, final_logit_softcap={numerics.final_logit_softcap} (probe error "
                    f"{err:.2g}): declare its head-side math in Numerics, or keep the loss"), None
        loss = F.cross_entropy(want.float()[0, :-1], labels[0, 1:])
        if out.loss is None or probe.scaled_error(loss, out.loss) > tol:
            return (f"{type(module).__name__}.forward's loss is not the cross-entropy of its logits "
                    f"({None if out.loss is None else float(out.loss):.4g} vs {float(loss):.4g}): keep the loss "
                    f"or write a loss hook"), None
    return None, type(out)


def causal_lm_replacement(arch, module: nn.Module, model: nn.Module) -> Replacement | Keep:
    """Replace a ``*ForCausalLM`` forward (see the module docstring)."""
    cls = type(module).__name__
    prefix = getattr(module, "base_model_prefix", None)
    backbone = getattr(module, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module):
        return Keep(f"{cls} has no backbone module at base_model_prefix {prefix!r}")
    head = module.get_output_embeddings()
    if not _plain_linear(head):
        return Keep(f"{cls}'s output embedding is a {type(head).__name__}, not an nn.Linear")
    sig = forward_signature(module)
    if "labels" not in sig.parameters or any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()):
        return Keep(f"{cls}.forward{sig} takes no labels= (or takes *args)")
    if head.weight.device.type == "meta":
        return Keep(f"{cls}: cannot prove the loss replacement on meta tensors")
    original = unbound_forward(module)
    numerics = arch.numerics
    reason, out_cls = probe.proven(arch, ("loss", type(module), original),
                                   lambda: prove_head(module, backbone, head, original, numerics))
    if reason:
        return Keep(reason)
    out_fields = [f.name for f in dataclasses.fields(out_cls) if f.name not in ("loss", "logits")]

    def forward(self, arguments: dict):
        labels, shifted = arguments.get("labels"), arguments.get("shift_labels")
        if ((labels is None and shifted is None) or not self.training or not torch.is_grad_enabled()
                or arguments.get("logits_to_keep", 0) not in (0, None) or getattr(self, "corept_return_logits", False)):
            return original(self, **arguments)
        outputs = getattr(self, prefix)(**{k: v for k, v in arguments.items() if k not in HEAD_ARGUMENTS},
                                        return_dict=True)
        unknown = [f for f, v in outputs.items() if f not in PASS_THROUGH and v is not None]
        aux = None
        if unknown == ["router_logits"] and isinstance(getattr(self, "router_aux_loss_coef", None), (int, float)):
            # MoE load balancing: the head adds router_aux_loss_coef x its aux loss. The original head
            # computes that aux loss without labels; one position's logits keep it cheap.
            with backbone_returning(getattr(self, prefix), outputs):
                aux = original(self, **{**arguments, "labels": None, "shift_labels": None, "logits_to_keep": 1,
                                        "return_dict": True}).aux_loss
        if unknown and aux is None:  # other head-side math corept does not know: the original head
            with backbone_returning(getattr(self, prefix), outputs):
                return original(self, **arguments)
        loss = fused_loss(self.get_output_embeddings(), outputs.last_hidden_state, labels, shift_labels_=shifted,
                          ignore_index=arguments.get("ignore_index", -100),
                          num_items_in_batch=arguments.get("num_items_in_batch"),
                          logit_scale=numerics.logit_scale, softcap=numerics.final_logit_softcap)
        if loss is None:  # the head's weight is sharded (e.g. a DTensor): transformers' path
            with backbone_returning(getattr(self, prefix), outputs):
                return original(self, **arguments)
        extra = {}
        if aux is not None:
            loss = loss + self.router_aux_loss_coef * aux.to(loss.device)
            extra = {"aux_loss": aux} if "aux_loss" in out_fields else {}
        out = out_cls(loss=loss, logits=None, **{f: outputs.get(f) for f in out_fields if f in outputs}, **extra)
        return out.to_tuple() if arguments.get("return_dict") is False else out

    return Replacement(kernel="fused_linear_cross_entropy", forward=forward, call_style="mapping")
