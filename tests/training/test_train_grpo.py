"""GRPO through TRL's ``GRPOTrainer`` (unmodified) on corept models: parity with the unpatched model
for every loss variant TRL offers, the ``corept train --method grpo`` options, and a CLI run.

Parity: one group of completions is sampled once (the patched model's ``generate()``, then scored
by a reward that varies with the text, so the advantages are not all zero); the same inputs then go
through TRL's loss on the patched model and, after ``corept.unpatch``, on the unpatched one. The
loss and every adapter gradient must agree (fp32, tight).
"""
import copy
import json

import pytest
import torch
import training_helpers as h
from datasets import Dataset

import corept
from corept.errors import InvalidOptionsError
from corept.testing.tolerances import assert_bf16_within, assert_fp32_close
from corept.training.compat import trl_head_scope
from corept.training.rewards import completion_text

#: TRL 1.16's loss_type values (GRPOConfig); luspo needs sequence-level importance sampling.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")
PROMPT = h.conv("user", "What is 2 + 3?")


def _varying_reward(completions, **_):
    return [float(sum(map(ord, completion_text(c))) % 7) for c in completions]


def _trainer(model, tok, tmp_path, loss_type: str, beta: float):
    from trl import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=4,
                     max_completion_length=6, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                     gradient_checkpointing=False, loss_type=loss_type, beta=beta, seed=0,
                     importance_sampling_level="sequence" if loss_type == "luspo" else "token")
    data = Dataset.from_list([{"prompt": PROMPT}] * 4)
    trainer = GRPOTrainer(model=model, reward_funcs=[_varying_reward], args=cfg, train_dataset=data,
                          processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before the first step
    return trainer


def _loss_and_grads(trainer, model, inputs):
    model.train()
    for p in model.parameters():
        p.grad = None
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss_type,beta", [(t, 0.0) for t in LOSS_TYPES] + [("dapo", 0.1)],
                         ids=[*LOSS_TYPES, "dapo-kl"])
def test_grpo_loss_and_adapter_grads_match_unpatched(tiny_chat, tmp_path, loss_type, beta):
    model, tok = h.load(tiny_chat, "lora", checkpointing=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)  # adapters that change the outputs
    assert "lora" in corept.report(model).applied
    with trl_head_scope(model):
        trainer = _trainer(model, tok, tmp_path, loss_type, beta)
        model.train()
        torch.manual_seed(0)
        inputs = trainer._generate_and_score_completions([{"prompt": PROMPT}] * 4)
        assert inputs["advantages"].abs().sum() > 0, "all advantages zero: the check could not fail"
        got_loss, got = _loss_and_grads(trainer, model, inputs)
    corept.unpatch(model)
    assert corept.report(model).applied == {}
    if "ref" in model.peft_config:  # beta > 0: TRL's reference adapter copy; the next trainer makes its own
        model.delete_adapter("ref")
        model.set_adapter("default")
    with trl_head_scope(model):
        want_loss, want = _loss_and_grads(_trainer(model, tok, tmp_path, loss_type, beta), model, inputs)
    assert_fp32_close(f"{loss_type} loss", got_loss, want_loss)
    assert got.keys() == want.keys() and got
    for name in want:
        assert_fp32_close(name, got[name], want[name])


def test_grpo_bf16_error_is_within_the_rule(tiny_chat, tmp_path):
    """bf16: the patched model's loss and adapter gradients are no further from an fp32 gold copy
    than twice the unpatched bf16 model's own error (corept.testing.tolerances)."""
    model, tok = corept.load(tiny_chat, max_seq_length=128, dtype=torch.bfloat16)
    model = corept.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    with trl_head_scope(model):
        trainer = _trainer(model, tok, tmp_path, "dapo", 0.0)
        model.train()
        torch.manual_seed(0)
        inputs = trainer._generate_and_score_completions([{"prompt": PROMPT}] * 4)
        assert inputs["advantages"].abs().sum() > 0
        patched = _loss_and_grads(trainer, model, inputs)
    corept.unpatch(model)
    gold_model = copy.deepcopy(model).float()
    results = []
    for m in (model, gold_model):
        with trl_head_scope(m):
            results.append(_loss_and_grads(_trainer(m, tok, tmp_path, "dapo", 0.0), m, inputs))
    (loss_u, unpatched), (loss_g, gold) = results
    assert_bf16_within("loss", patched[0], loss_u, loss_g)
    for name in gold:
        assert_bf16_within(name, patched[1][name], unpatched[name], gold[name])


# ----------------------------------------------------------------------------- corept train --method grpo

def _opts(**kw):
    from corept.training.options import TrainOptions, finalize

    return finalize(TrainOptions(**{**dict(model="m", data="d.jsonl", output="/tmp/unused-grpo-out", method="grpo",
                                           max_steps=2, batch_size=4), **kw}), on_gpu=False)


@pytest.mark.parametrize("kw,match", [
    (dict(num_generations=1), "at least 2"),
    (dict(num_generations=3), r"must be a multiple of --num-generations \(3\)"),
    (dict(max_completion_length=0), "--max-completion-length must be a positive"),
    (dict(beta=-0.1), "must be >= 0"),
    (dict(rewards=["format=("]), "not a valid regular expression"),
    (dict(method="sft", rewards=["format"]), "--reward applies to --method grpo"),
    (dict(method="dpo", num_generations=4), "--num-generations applies to --method grpo"),
])
def test_bad_grpo_options_are_refused_before_anything_loads(kw, match):
    from corept.training.options import validate

    with pytest.raises(InvalidOptionsError, match=match):
        validate(_opts(**kw))


def test_grpo_defaults():
    opts = _opts(batch_size=None)
    assert opts.batch_size == 4  # one group a step unless --batch-size says otherwise
    assert (opts.num_generations, opts.max_completion_length, opts.beta, opts.lr) == (4, 128, 0.0, 5e-5)
    assert _opts(method="dpo").beta == 0.1 and not _opts().packing


def test_cli_grpo_trains_rewards_and_saves(tiny_chat, tmp_path, capsys):
    from corept.cli import main

    data = h.write_jsonl(tmp_path / "math.jsonl", [{"prompt": h.conv("user", f"What is {i} + 1?"), "answer": str(i + 1),
                                                    "level": "easy"} for i in range(8)])
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_chat, "--data", str(data), "--method", "grpo", "--output", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--num-generations", "4", "--max-completion-length", "6",
                 "--reward", "length=3", "--reward", "exact_match", "--max-seq-length", "64"]) == 0
    text = capsys.readouterr().out
    assert "prompt-only format) -> method grpo" in text and "reward: first" in text
    rec = json.loads((out / "run.json").read_text())
    assert rec["options"]["rewards"] == ["length=3", "exact_match"]
    assert len(rec["reward"]["points"]) == 2 and rec["greedy_patched_equals_unpatched"] is True
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_grpo_data_errors_name_the_row(tiny_chat, tmp_path, capsys, no_model_load):
    from corept.cli import main

    out = tmp_path / "run"
    no_prompt = h.write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "answer": "1"}, {"question": "q", "answer": "1"}])
    no_answer = h.write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "answer": "1"}, {"prompt": "r", "answer": ""}])
    for data, match in ((no_prompt, "row 1 (line 2) lacks 'prompt'"), (no_answer, "row 1 has no 'answer'")):
        assert main(["train", "--model", tiny_chat, "--data", str(data), "--method", "grpo", "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("corept: error: ") and match in err and "Traceback" not in err, err
    assert not out.exists()


def test_demo_grpo_is_one_flag_away(corept_cache, tmp_path, capsys):
    from corept.cli import main

    assert main(["demo", "--method", "grpo", "--max-steps", "2", "--output", str(tmp_path / "grpo")]) == 0
    out = capsys.readouterr().out
    assert "prompt-only format) -> method grpo" in out and "held-out question: What is 17 + 25?" in out
    rec = json.loads((tmp_path / "grpo" / "run.json").read_text())
    assert rec["options"]["rewards"] == ["exact_match", "length=6"] and len(rec["reward"]["points"]) == 2


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_build_trainer_grpo_trains_every_mode(tiny_chat, mode, monkeypatch):
    """corept's own path (corept.training.trainers.build_trainer): two GRPO steps move the trainable
    weights, and every one stays finite (4-bit base: its quantization survives). The tiny model's
    text has no words or numbers, so the built-in rewards would score every completion alike (no
    advantage, no update): a reward that varies with the text stands in."""
    from corept.training import rewards
    from corept.training.trainers import build_trainer

    monkeypatch.setattr(rewards, "resolve", lambda *args: [_varying_reward])
    model, tok = h.load(tiny_chat, mode, checkpointing=False)
    data = Dataset.from_list([{"prompt": h.conv("user", f"What is {i} + 1?"), "answer": str(i + 1)} for i in range(4)])
    opts = h.options("grpo", mode, max_steps=2, batch_size=4, num_generations=4, max_completion_length=6,
                     rewards=["length=3"], beta=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with trl_head_scope(model):
        trainer = build_trainer("grpo", model, tok, data, opts)
        trainer.train()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    assert getattr(model, "is_loaded_in_4bit", False) == (mode == "qlora")
