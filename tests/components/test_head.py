"""The fused loss runs inside the head's own call, so an engine's forward hooks gather its weight first.

A stand-in for FSDP2 / ZeRO-3 keeps only half of ``lm_head``'s rows on the module between calls and
puts the full weight in place in a forward pre-hook (taking it away again in a forward hook). The
patched model must still train on the full weight, fused (``logits is None``), with the loss and
gradients of a model that never had its head sharded.
"""
import pytest
import torch
import torch.nn as nn
import tiny

import corept
from corept.components import head as loss_module


class ShardingHooks:
    """Half the rows of ``head.weight`` between calls, the full weight during them."""

    def __init__(self, head: nn.Linear):
        self.head, self.full = head, head.weight
        self.shard = nn.Parameter(self.full.detach()[: self.full.shape[0] // 2].clone(), requires_grad=False)
        self.calls = 0
        head.register_forward_pre_hook(self.gather)
        head.register_forward_hook(self.release)
        self.release()

    def gather(self, *_):
        self.calls += 1
        self.head.weight = self.full

    def release(self, *_):
        self.head.weight = self.shard


def _batch(vocab: int):
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    return dict(input_ids=ids, labels=ids)


def test_fused_loss_gathers_the_head_through_its_hooks():
    ref = tiny.tiny_model("llama").train()
    model = tiny.tiny_model("llama").train()
    corept.patch(model)
    hooks = ShardingHooks(model.lm_head)
    batch = _batch(model.config.vocab_size)
    out = model(**batch)
    assert out.logits is None, "expected the fused path"
    assert hooks.calls == 1 and model.lm_head.weight is hooks.shard  # hooks ran once, shard back afterwards
    out.loss.backward()
    want = ref(**batch).loss
    want.backward()
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(hooks.full.grad, ref.lm_head.weight.grad)
    torch.testing.assert_close(model.model.embed_tokens.weight.grad, ref.model.embed_tokens.weight.grad)
    assert "forward" not in model.lm_head.__dict__


def test_through_head_computes_on_the_weight_its_hooks_put_in_place():
    model = tiny.tiny_model("llama").train()
    hooks = ShardingHooks(model.lm_head)
    h = torch.randn(4, model.config.hidden_size)
    targets = torch.randint(0, model.config.vocab_size, (4,))
    assert model.lm_head.weight.shape[0] == model.config.vocab_size // 2  # what a direct read would get
    assert not loss_module._gathered(model.lm_head.weight, model.lm_head)
    loss = loss_module.through_head(model.lm_head, h, targets)
    assert hooks.calls == 1
    torch.testing.assert_close(loss, nn.functional.cross_entropy(h @ hooks.full.detach().t(), targets))


def test_head_not_usable_inside_the_call_falls_back_and_restores_forward():
    head = nn.Linear(8, 11, bias=False)
    marker = head.forward
    head.forward = marker  # an instance forward set by someone else must survive
    with torch.device("meta"):
        head.weight = nn.Parameter(torch.empty(11, 8))
    assert loss_module.through_head(head, torch.randn(3, 8), torch.randint(0, 11, (3,))) is None
    assert head.__dict__["forward"] is marker


def test_forward_restored_when_the_kernel_raises():
    head = nn.Linear(8, 11, bias=False)
    with pytest.raises(ValueError, match=r"is not \[V"):
        loss_module.through_head(head, torch.randn(3, 7), torch.randint(0, 11, (3,)))  # wrong hidden width
    assert "forward" not in head.__dict__
