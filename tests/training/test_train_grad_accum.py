"""Gradient accumulation is exact through corept's fused loss path, with uneven padding.

k micro-batches, each padded only to its own longest row, each loss divided by
``num_items_in_batch`` = the non-ignored target tokens of the *whole* batch (what the HF Trainer
passes), summed and back-propagated one by one, give the loss and the gradients of the whole
batch in one call. A control shows the per-micro-batch mean (no ``num_items_in_batch``) does not.
"""
import pytest
import torch
import training_helpers as h

import corept

LENGTHS = [12, 5, 9, 3]  # uneven: micro-batches pad to different lengths


def _rows(vocab: int):
    g = torch.Generator().manual_seed(11)
    rows = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(4, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 2] = -100  # some prompt tokens without a target
        rows.append((ids, labels))
    return rows


def _pad(rows, pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
    return dict(input_ids=ids, labels=labels, attention_mask=mask)


def _targets(rows) -> int:
    return int(sum((y[1:] != -100).sum() for _, y in rows))


def _run(model, batches, num_items):
    model.zero_grad()
    total = 0.0
    for b in batches:
        out = model(**b, num_items_in_batch=num_items)
        assert out.logits is None, "expected corept's fused linear cross-entropy path"
        out.loss.backward()
        total += out.loss.detach()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_micro_batches_equal_whole_batch(tiny_chat, mode, k):
    model, tok = h.load(tiny_chat, mode, checkpointing=False)
    if mode == "lora":
        with torch.no_grad():  # trained-looking adapters, so the LoRA kernels matter
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    model.train()
    rows = _rows(model.config.vocab_size)
    n_items = torch.tensor(_targets(rows))
    whole_loss, whole = _run(model, [_pad(rows, tok.pad_token_id)], n_items)
    size = len(rows) // k
    micro = [_pad(rows[i:i + size], tok.pad_token_id) for i in range(0, len(rows), size)]
    assert len({b["input_ids"].shape[1] for b in micro}) > 1  # padding really differs
    acc_loss, acc = _run(model, micro, n_items)
    torch.testing.assert_close(acc_loss, whole_loss)
    for name, g in whole.items():
        torch.testing.assert_close(acc[name], g, msg=name)
    if mode == "full":  # the whole-batch loss is the token mean of an unpatched model
        ref, _ = corept.load(tiny_chat, patch=False)
        ref.train()
        torch.testing.assert_close(whole_loss, ref(**_pad(rows, tok.pad_token_id)).loss.detach())
    # control: averaging each micro-batch on its own weights tokens unevenly
    naive = sum(model(**b).loss.detach() for b in micro) / len(micro)
    assert not torch.allclose(naive, whole_loss, rtol=1e-3)


def _train_one_step(folder, tmp_path, batch_size, accum):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model, tok = corept.load(folder)
    rows = _rows(model.config.vocab_size) * 2
    ds = Dataset.from_list([{"input_ids": x.tolist(), "labels": y.tolist()} for x, y in rows])
    args = TrainingArguments(output_dir=str(tmp_path / f"t{batch_size}x{accum}"),
                             per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accum, max_steps=1, learning_rate=1.0, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, report_to="none",
                             save_strategy="no", seed=0, data_seed=0, logging_steps=1, disable_tqdm=True,
                             remove_unused_columns=False)

    def collate(items):
        return _pad([(torch.tensor(i["input_ids"]), torch.tensor(i["labels"])) for i in items], tok.pad_token_id)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate)
    assert trainer.model_accepts_loss_kwargs  # so the Trainer passes num_items_in_batch
    trainer.train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, trainer.state.log_history[0]["loss"]


def test_hf_trainer_accumulation_matches_one_big_batch(tiny_chat, tmp_path):
    """HF Trainer, one SGD step: batch 4 == batch 2 x accum 2 == batch 1 x accum 4 (uneven padding)."""
    big, big_loss = _train_one_step(tiny_chat, tmp_path, 4, 1)
    for bs, ga in ((2, 2), (1, 4)):
        upd, loss = _train_one_step(tiny_chat, tmp_path, bs, ga)
        assert loss == pytest.approx(big_loss, rel=1e-6)
        for name, d in big.items():
            torch.testing.assert_close(upd[name], d, msg=f"{bs}x{ga} {name}")
