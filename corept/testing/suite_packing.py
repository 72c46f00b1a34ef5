"""The conformance suite's packing checks: documents packed into one row train as if alone.

A padding-free batch (what TRL's ``padding_free`` collator builds) is one row holding several
documents: ``input_ids [1, T]``, ``position_ids`` restarting at 0 for each document, labels with
``-100`` on each document's first token (so no document predicts the next one's start), and the
boundaries ``cu_seq_lens_q/k`` (int32 ``[N+1]``) with ``max_length_q/k``.

* The patched model with LoRA on the packed row gives the logits of every document, the summed
  loss and every adapter gradient of the *unpatched* reference run on each document alone (fp32
  tightly; bf16 by the project's rule against an fp32 gold copy, also run document by document).
* Changing one document's tokens moves no other document's logits (bitwise): no attention crosses
  a boundary, through the collator's boundaries and through position ids alone.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

import corept
from corept.testing import builders as B
from corept.testing.tolerances import assert_bf16_within, assert_fp32_close

#: document lengths of the packed row: uneven, one single token, one longer than the suite's rows
LENGTHS = (5, 1, 11, 3, 7)


def documents(vocab: int, lengths=LENGTHS, seed: int = 11) -> list[torch.Tensor]:
    """Random token documents ``[L_i]`` (int64)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def packed_batch(docs: list[torch.Tensor], *, boundaries: bool = True) -> dict:
    """One padding-free row of ``docs`` as TRL's padding-free collator builds it (``T = sum L_i``)."""
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    labels[positions == 0] = -100
    # no KV cache: transformers derives the document mask from position ids only without one
    batch = {"input_ids": ids, "position_ids": positions, "labels": labels, "use_cache": False}
    if boundaries:
        lengths = torch.tensor([len(d) for d in docs])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(lengths.max()),
                     max_length_k=int(lengths.max()))
    return batch


@dataclass
class DocOutcome:
    """Logits of every document's tokens ``[T, V]`` (documents in order), the loss summed over every
    target token, and the adapters' gradients of that sum."""

    logits: torch.Tensor
    loss_sum: torch.Tensor
    grads: dict = field(default_factory=dict)


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _zero(model) -> None:
    for p in model.parameters():
        p.grad = None


def run_packed(model, docs: list[torch.Tensor], device) -> DocOutcome:
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in packed_batch(docs).items()}
    targets = int((batch["labels"][:, 1:] != -100).sum())
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0].float()
    model.train()
    _zero(model)
    loss_sum = model(**batch).loss * targets
    loss_sum.backward()
    model.eval()
    return DocOutcome(logits, loss_sum.detach(), _grads(model))


def run_separately(model, docs: list[torch.Tensor], device) -> DocOutcome:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(input_ids=d[None].to(device)).logits[0].float() for d in docs])
    model.train()
    _zero(model)
    total = 0.0
    for d in docs:
        if len(d) > 1:  # a one-token document has no target
            ids = d[None].to(device)
            loss = model(input_ids=ids, labels=ids).loss * (len(d) - 1)
            loss.backward()
            total = total + loss.detach()
    model.eval()
    return DocOutcome(logits, total, _grads(model))


def _fp32_equal(got: DocOutcome, want: DocOutcome) -> None:
    assert_fp32_close("logits", got.logits, want.logits)
    assert_fp32_close("summed loss", got.loss_sum, want.loss_sum)
    assert got.grads.keys() == want.grads.keys() and want.grads
    for name, w in want.grads.items():
        assert_fp32_close(f"grad[{name}]", got.grads[name], w)


def _bf16_within(got: DocOutcome, ref: DocOutcome, gold: DocOutcome) -> None:
    assert_bf16_within("logits", got.logits, ref.logits, gold.logits)
    assert_bf16_within("summed loss", got.loss_sum, ref.loss_sum, gold.loss_sum)
    assert got.grads.keys() == ref.grads.keys() and ref.grads
    for name, r in ref.grads.items():
        assert_bf16_within(f"grad[{name}]", got.grads[name], r, gold.grads[name])


class PackingChecks:
    """Mixed into :class:`~corept.testing.ConformanceSuite` (its attributes and helpers)."""

    def _lora_pair(self, store, name, dtype):
        base = store.base(name)
        targets = B.lora_targets(base, store.arch(name))
        kw = dict(targets=targets, rank=self.lora_rank, checkpointing=False)
        patched = B.add_lora(corept.patch(copy.deepcopy(base).to(dtype)), patched=True, **kw)
        ref = B.add_lora(copy.deepcopy(base).to(dtype), patched=False, **kw)
        return patched, ref, kw

    def test_packed_documents_train_like_separate_fp32(self, corept_store, config_name):
        """fp32: packed patched == each document alone through the unpatched reference."""
        patched, ref, _ = self._lora_pair(corept_store, config_name, torch.float32)
        docs = documents(B.vocab_size(ref))
        _fp32_equal(run_packed(patched, docs, "cpu"), run_separately(ref, docs, "cpu"))

    def test_packed_documents_train_like_separate_bf16(self, corept_store, config_name):
        """bf16: packed patched within the bf16 rule of the unpatched bf16 run alone, vs fp32 gold."""
        patched, ref, kw = self._lora_pair(corept_store, config_name, torch.bfloat16)
        gold = B.add_lora(B.to_fp32_gold(copy.deepcopy(corept_store.base(config_name)).to(torch.bfloat16)),
                          patched=False, **kw)
        docs = documents(B.vocab_size(ref))
        _bf16_within(run_packed(patched, docs, "cpu"), run_separately(ref, docs, "cpu"),
                     run_separately(gold, docs, "cpu"))

    def test_packed_documents_do_not_attend_across(self, corept_store, config_name):
        """New tokens in one document leave every other document's logits bitwise unchanged, with and
        without the collator's boundaries (position ids alone). Mixture-of-experts models: unchanged to
        fp32 rounding, as the grouped GEMMs' row results may differ in their last bit when other rows
        join an expert's group (the change moves rows between groups; crossing attention would move
        these logits by far more: 0.6 of their largest on gpt-oss's kit config)."""
        exact = not corept_store.arch(config_name).roles.experts
        model = corept.patch(copy.deepcopy(corept_store.base(config_name)))
        model.eval()
        vocab = B.vocab_size(model)
        docs = documents(vocab)
        changed = list(docs)
        changed[2] = (docs[2] + 1 + torch.randint(0, vocab - 1, docs[2].shape,
                                                   generator=torch.Generator().manual_seed(5))) % vocab
        starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
        for boundaries in (True, False):
            with torch.no_grad():
                a, b = (model(**packed_batch(d, boundaries=boundaries)).logits[0] for d in (docs, changed))
            inside = slice(starts[2], starts[3])
            assert not torch.equal(a[inside], b[inside]), "the changed document's logits did not move"
            for i in range(len(LENGTHS)):
                if i != 2:
                    rows = slice(starts[i], starts[i + 1])
                    if not exact:
                        assert_fp32_close(f"document {i}'s logits ({boundaries=})", b[rows], a[rows])
                        continue
                    assert torch.equal(a[rows], b[rows]), (
                        f"document {i}'s logits moved when document 2 changed (boundaries "
                        f"{'from cu_seq_lens' if boundaries else 'from position_ids'}): attention crosses documents")
