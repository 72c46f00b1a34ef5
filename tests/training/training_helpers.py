"""Shared helpers of the training tests: memorizable rows, model loading per mode, small options."""
from __future__ import annotations

import json
import math
from pathlib import Path

Q = "What is corept?"
A = "corept patches transformers models with Triton kernels."
BAD = "corept is a JavaScript framework for building websites."


def conv(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def rows(method: str, n: int = 8) -> list[dict]:
    """``n`` memorizable rows for ``method`` (the same question, so a few steps lower the loss)."""
    if method == "sft":
        return [{"prompt": conv("user", Q), "completion": conv("assistant", A)} for _ in range(n)]
    if method == "dpo":
        return [{"prompt": conv("user", Q), "chosen": conv("assistant", A), "rejected": conv("assistant", BAD)}
                for _ in range(n)]
    if method == "kto":
        return [{"prompt": conv("user", Q), "completion": conv("assistant", A if i % 2 == 0 else BAD),
                 "label": i % 2 == 0} for i in range(n)]
    raise ValueError(method)


def dataset(method: str, n: int = 8):
    from datasets import Dataset

    return Dataset.from_list(rows(method, n))


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def load(folder: str, mode: str, *, r: int = 8, checkpointing="corept"):
    """``(model, tokenizer)`` for ``mode``: ``lora``, ``qlora`` (4-bit base) or ``full``."""
    import corept

    model, tok = corept.load(folder, max_seq_length=128, load_in_4bit=mode == "qlora",
                             full_finetuning=mode == "full")
    if mode != "full":
        model = corept.get_peft_model(model, r=r, lora_alpha=2 * r, use_gradient_checkpointing=checkpointing)
    return model, tok


def options(method: str, mode: str = "lora", **kw):
    """Small :class:`TrainOptions` for direct ``build_trainer`` calls (no output folder needed)."""
    from corept.training.options import TrainOptions

    lr = 3e-3 if mode == "full" else 1e-2
    values = dict(method=method, max_steps=6, batch_size=4, grad_accum=1, lr=lr, max_seq_length=64,
                  r=8, lora_alpha=16, epochs=1.0, optim="adamw_torch", full_finetuning=mode == "full",
                  load_in_4bit=mode == "qlora", seed=0, logging_steps=1)
    values.update(kw)
    return TrainOptions(**values)


def losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def assert_falling(values: list[float]) -> None:
    assert values and all(math.isfinite(v) for v in values), values
    first, last = values[0], sum(values[-2:]) / len(values[-2:])
    assert last < first, f"loss did not fall: {values}"
