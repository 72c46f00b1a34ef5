"""Running a model the way training and inference do, and comparing the results as whole tensors."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from corept.testing.tolerances import assert_bf16_within, assert_fp32_close


@dataclass
class Outcome:
    """What one model produced on one batch.

    :param logits: eval-mode logits ``[B, S, V]`` (``None`` if not run).
    :param loss: training-mode loss (labels with ``-100``), the tensor backward ran from.
    :param loss_nib: training-mode loss with ``num_items_in_batch`` (``None`` if not run).
    :param grads: name -> gradient of every trainable parameter after ``loss.backward()``.
    :param logits_in_training: the training forward returned logits (``False`` when a fused loss
        computed the loss without them).
    """

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    loss_nib: torch.Tensor | None = None
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    logits_in_training: bool = True


def eval_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Eval-mode logits for ``input_ids``/``attention_mask`` (no labels), under no_grad."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits.detach().clone()


def num_items(batch: dict) -> int:
    """Tokens that carry a target after the causal shift (what a Trainer passes as num_items_in_batch)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def train_pass(model: nn.Module, batch: dict, *, backward: bool = True, nib: bool = False) -> Outcome:
    """A training-mode forward with labels (and ``num_items_in_batch`` when ``nib``), then backward.

    Gradients start from ``None``; the returned grads are clones (missing grads are reported as
    such by :func:`compare`, never silently skipped).
    """
    model.train()
    for p in model.parameters():
        p.grad = None
    kwargs = {"num_items_in_batch": torch.tensor(num_items(batch))} if nib else {}
    with torch.enable_grad():
        out = model(**batch, **kwargs)
        if out.loss is None:
            raise AssertionError("a training forward with labels returned no loss")
        if backward:
            out.loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None)
             for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    res = Outcome(grads=grads if backward else {}, logits_in_training=out.logits is not None)
    if nib:
        res.loss_nib = out.loss.detach()
    else:
        res.loss = out.loss.detach()
    return res


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _pairs(patched: Outcome, ref: Outcome, gold: Outcome | None):
    if patched.logits is not None or ref.logits is not None:
        yield "logits", patched.logits, ref.logits, gold.logits if gold else None
    if patched.loss is not None or ref.loss is not None:
        yield "loss", patched.loss, ref.loss, gold.loss if gold else None
    if patched.loss_nib is not None or ref.loss_nib is not None:
        yield "loss(num_items_in_batch)", patched.loss_nib, ref.loss_nib, gold.loss_nib if gold else None
    if set(patched.grads) != set(ref.grads):
        raise AssertionError(f"trainable parameters differ: only patched {sorted(set(patched.grads) - set(ref.grads))}"
                             f", only reference {sorted(set(ref.grads) - set(patched.grads))}")
    for n in sorted(ref.grads):
        yield f"grad[{n}]", patched.grads[n], ref.grads[n], (gold.grads.get(n) if gold else None)


def compare(patched: Outcome, ref: Outcome, gold: Outcome | None = None) -> int:
    """Compare everything both outcomes hold: fp32-tight when ``gold`` is ``None``, else the bf16
    rule against ``gold``. Returns how many tensors were compared."""
    n = 0
    errors = []
    for name, p, r, g in _pairs(patched, ref, gold):
        if (p is None) != (r is None):
            errors.append(f"{name}: patched {'missing' if p is None else 'present'}, reference "
                          f"{'missing' if r is None else 'present'} (a parameter without a gradient?)")
            continue
        if p is None:
            continue
        try:
            if gold is None:
                assert_fp32_close(name, p, r)
            else:
                if g is None:
                    raise AssertionError(f"{name}: the fp32 gold has no value")
                assert_bf16_within(name, p, r, g)
        except AssertionError as exc:
            errors.append(str(exc))
        n += 1
    if errors:
        raise AssertionError(f"{len(errors)} of {n} tensors differ:\n" + "\n".join(errors[:8]))
    if n == 0:
        raise AssertionError("nothing was compared")
    return n


def greedy(model: nn.Module, batch: dict, new_tokens: int) -> torch.Tensor:
    """Greedy ``generate()`` with the KV cache, exactly ``new_tokens`` new tokens."""
    model.eval()
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=0)


def instance_state(model: nn.Module) -> dict:
    """``{module path: {instance attribute: id(value)}}`` for every module (identity snapshot)."""
    return {name: {k: id(v) for k, v in m.__dict__.items()} for name, m in model.named_modules()}


def assert_state_dict_equal(a: dict, b: dict, what: str) -> None:
    """Same keys, dtypes, shapes and bitwise-equal values. Key order is not compared: peft's
    ``ParamWrapper`` (LoRA on stacked experts) re-registers the wrapped parameters last on every
    forward it runs, so the order of a module's keys depends on which forwards ran."""
    if set(a) != set(b):
        raise AssertionError(f"{what}: state_dict keys differ: only first {sorted(set(a) - set(b))[:5]}, "
                             f"only second {sorted(set(b) - set(a))[:5]}")
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            raise AssertionError(f"{what}: state_dict[{k!r}] differs")
