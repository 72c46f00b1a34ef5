"""Installed forwards keep the signature of the forward they replace, and callers that read
signatures (``generate()``, the ``Trainer``) behave as on the unpatched model."""
from __future__ import annotations

import copy
import inspect
import types

import pytest
import torch

import corept
from corept.patching.signature import faithful_forward
from corept.testing import live
import tiny


class _Odd(torch.nn.Module):
    def forward(self, x, /, y: int = 2, *rest, scale: float = 1.0, **extra) -> torch.Tensor:
        return x * y * scale + sum(rest) + len(extra)


def test_faithful_forward_keeps_every_parameter_kind():
    module = _Odd()
    seen = []

    def impl(self, x, y, *rest, scale, **extra):
        seen.append((y, rest, scale, extra))
        return type(self).forward(self, x, y, *rest, scale=scale, **extra)

    before = inspect.signature(module.forward)
    module.forward = types.MethodType(faithful_forward(module, impl), module)
    assert inspect.signature(module.forward) == before  # names, kinds, defaults and annotations
    assert module(torch.ones(1), 3, 4, 5, scale=2.0, k=1).item() == 1 * 3 * 2.0 + 9 + 1
    assert seen[-1] == (3, (4, 5), 2.0, {"k": 1})
    with pytest.raises(TypeError):
        module(x=torch.ones(1))  # x stays positional-only


def test_mapping_style_receives_the_arguments_given_by_name():
    class Head(torch.nn.Module):
        def forward(self, input_ids=None, labels=None, *, logits_to_keep: int = 0, **kwargs):
            return None

    head = Head()
    got = {}
    head.forward = types.MethodType(faithful_forward(head, lambda self, a: got.update(a), call_style="mapping"), head)
    head(1, labels=2, logits_to_keep=5, num_items_in_batch=3)
    assert got == {"input_ids": 1, "labels": 2, "logits_to_keep": 5, "num_items_in_batch": 3}
    got.clear()
    head(1)
    assert got == {"input_ids": 1}  # defaults stay the replaced forward's own


def test_a_renamed_argument_reaches_the_replaced_forward():
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` behind ``deprecate_kwarg``, which keeps
    an explicit ``cache=None`` over a caller's ``past_key_values=``: a mapping-style replacement that
    handed every default on would silently drop the caller's cache."""
    from transformers.utils.deprecation import deprecate_kwarg

    class Model(torch.nn.Module):
        @deprecate_kwarg("past_key_values", version="99.0", new_name="cache")
        def forward(self, input_ids=None, cache=None, labels=None, **kwargs):
            return cache

    model = Model()
    model.forward = types.MethodType(faithful_forward(model, lambda self, a: type(self).forward(self, **a),
                                                      call_style="mapping"), model)
    assert model(1, past_key_values="kv") == "kv" and model(1, cache="c") == "c" and model(1) is None


@pytest.mark.parametrize("model_type", tiny.ARCHS)
def test_every_patched_forward_keeps_its_signature(model_type):
    model = corept.patch(tiny.tiny_model(model_type))
    components = live.check_signatures(model)
    assert components > 0
    peft_model = corept.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    assert live.check_signatures(peft_model) > components  # + the fused LoRA forwards


def test_generate_without_attention_mask_matches_unpatched():
    """Left-padded prompts and no mask: generate() builds the mask because the patched forward
    still names ``attention_mask`` (a ``**kwargs`` forward would make it skip that)."""
    base = tiny.tiny_model("llama")
    ids = torch.randint(3, tiny.VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    ids[0, :3] = 0
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = copy.deepcopy(base).eval().generate(ids, **kw)
        got = corept.patch(copy.deepcopy(base)).eval().generate(ids, **kw)
    assert torch.equal(got, want), (got.tolist(), want.tolist())


def test_trainer_keeps_the_same_dataset_columns(tmp_path):
    """``remove_unused_columns`` keeps the columns the forward names: the same set patched or not
    (``attention_mask`` and ``position_ids`` included, which padding-free batches need)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=True)
    columns = []
    for model in (tiny.tiny_model("llama"), corept.patch(tiny.tiny_model("llama"))):
        trainer = Trainer(model=model, args=args)
        trainer._set_signature_columns_if_needed()
        columns.append(trainer._signature_columns)
    assert columns[0] == columns[1] and {"attention_mask", "position_ids", "labels"} <= set(columns[1])


def test_a_clone_with_globals_has_a_module_of_its_own_while_it_lives():
    """The clone's globals are a registered module's namespace (what Dynamo guards through), with
    the overrides in it; the module leaves ``sys.modules`` when the clone is collected."""
    import gc
    import sys

    from corept.patching.signature import clone_with_globals

    def original(x):
        return helper(x)  # noqa: F821 - resolved in the clone's globals

    clone = clone_with_globals(original, {"helper": lambda x: x + 1})
    name = clone.__globals__["__name__"]
    assert sys.modules[name].__dict__ is clone.__globals__ and name != original.__module__
    assert clone(1) == 2 and "helper" not in original.__globals__
    del clone
    gc.collect()
    assert name not in sys.modules
