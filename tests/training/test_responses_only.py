"""Loss on the assistant turns only (``corept.train_on_responses_only``, ``corept train --train-on``).

The masks are checked against hand-labelled text: for each real tokenizer template in
``tests/data/chat_templates`` (Llama 3.1, Qwen3, Qwen2.5, Gemma 2 and 3, Mistral v0.3, SmolLM2) and
each conversation, the exact runs of trained tokens are written out below, decoded from the token
ids (not from the spans the code computes). They must hold the answer and its end-of-turn token,
never the assistant header. The tokenizer is a small byte-level BPE trained here on the test
texts, with every template's markers added as special tokens, so each marker is one token and the
answers are several. Then TRL's SFTTrainer: packed / padding-free batches built from the dataset,
and the batch ``corept train --train-on responses`` trains on.
"""
import shutil
from pathlib import Path

import pytest
import torch
import training_helpers as h

import corept
from corept.tiny import tiny_tokenizer
from corept.training.chat_templates import ChatTemplateError, read_template
from corept.training.responses_only import resolve_train_on, sft_training_data, tokenize_conversation

REAL = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
           "<|im_end|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>", "[INST]", "[/INST]"]
#: real template file -> (bos_token, eos_token, end-of-turn marker, assistant header that must not be trained)
TEMPLATES = {
    "llama-3.1-8b-instruct": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", "<|start_header_id|>assistant"),
    "qwen3-8b": ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|im_start|>assistant"),
    "qwen2.5-7b-instruct": ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|im_start|>assistant"),
    "smollm2-135m-instruct": ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|im_start|>assistant"),
    "gemma-2-9b-it": ("<bos>", "<eos>", "<end_of_turn>", "<start_of_turn>model"),
    "gemma-3-4b-it": ("<bos>", "<eos>", "<end_of_turn>", "<start_of_turn>model"),
    "mistral-7b-instruct-v0.3": ("<s>", "</s>", "</s>", "[/INST]"),
}


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


SYSTEM = msg("system", "You are terse.")
CHAT = [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Bye"), msg("assistant", "See you.")]
TOOL = [msg("user", "What is 6 times 7?"), msg("assistant", "Let me check."), msg("tool", "result: 42"),
        msg("assistant", "It is 42.")]
THINK = [msg("user", "Hi"), msg("assistant", "<think>\nGreet back.\n</think>\n\nHello!"), msg("user", "Bye"),
         msg("assistant", "<think>\nSay goodbye.\n</think>\n\nSee you.")]
TEXTS = [m["content"] for m in [SYSTEM, *CHAT, *TOOL, *THINK]] + ["Cutting Knowledge Date", "Qwen"]

#: (template, conversation) -> the trained text, one string per run of trained tokens (hand-labelled)
CASES = {
    ("llama-3.1-8b-instruct", "system"): ["Hello!<|eot_id|>", "See you.<|eot_id|>"],
    ("llama-3.1-8b-instruct", "tool"): ["Let me check.<|eot_id|>", "It is 42.<|eot_id|>"],
    # Qwen3 adds an empty reasoning block to turns after the last user message only (the last
    # renders differently alone), and drops the reasoning of turns before it
    ("qwen3-8b", "system"): ["Hello!<|im_end|>", "<think>\n\n</think>\n\nSee you.<|im_end|>"],
    ("qwen3-8b", "tool"): ["Let me check.<|im_end|>", "<think>\n\n</think>\n\nIt is 42.<|im_end|>"],
    ("qwen3-8b", "think"): ["Hello!<|im_end|>", "<think>\nSay goodbye.\n</think>\n\nSee you.<|im_end|>"],
    ("qwen2.5-7b-instruct", "chat"): ["Hello!<|im_end|>", "See you.<|im_end|>"],  # its default system prompt
    ("qwen2.5-7b-instruct", "tool"): ["Let me check.<|im_end|>", "It is 42.<|im_end|>"],
    ("smollm2-135m-instruct", "system"): ["Hello!<|im_end|>", "See you.<|im_end|>"],
    ("gemma-2-9b-it", "chat"): ["Hello!<end_of_turn>", "See you.<end_of_turn>"],  # Gemma 2 refuses system
    ("gemma-3-4b-it", "system"): ["Hello!<end_of_turn>", "See you.<end_of_turn>"],
    # Mistral v0.3 writes the system prompt into the last user message only (here: nowhere)
    ("mistral-7b-instruct-v0.3", "system"): [" Hello!</s>", " See you.</s>"],
    ("mistral-7b-instruct-v0.3", "chat"): [" Hello!</s>", " See you.</s>"],
}
CONVERSATIONS = {"system": [SYSTEM, *CHAT], "chat": CHAT, "tool": TOOL, "think": THINK}


def tokenizer(template: str):
    """The test tokenizer with ``template``'s real chat template and BOS/EOS."""
    tok = tiny_tokenizer(TEXTS * 4, vocab_size=420)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    tok.bos_token, tok.eos_token = TEMPLATES[template][:2]
    tok.chat_template = (REAL / f"{template}.jinja").read_text()
    return tok


def runs(tok, ids, keep) -> list[str]:
    """The decoded runs of consecutive tokens whose ``keep`` flag is true."""
    out, cur = [], []
    for i, k in zip(ids, keep):
        if k:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out + ([tok.decode(cur)] if cur else [])


@pytest.mark.parametrize("template,conversation", sorted(CASES))
def test_assistant_turns_are_trained_with_their_end_of_turn_token(template, conversation):
    tok = tokenizer(template)
    messages = CONVERSATIONS[conversation]
    data = corept.train_on_responses_only([{"messages": messages}], tok)
    assert data.column_names == ["input_ids", "assistant_masks"]
    ids, mask = data[0]["input_ids"], data[0]["assistant_masks"]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == rendered
    trained = runs(tok, ids, mask)
    assert trained == CASES[template, conversation]
    _, _, end, header = TEMPLATES[template]
    for text in trained:
        assert text.endswith(end) and header not in text  # the answer and its end-of-turn, never the header
    untrained = tok.decode([i for i, k in zip(ids, mask) if not k])
    for m in messages:
        if m["role"] != "assistant" and m["content"] in rendered:  # Mistral v0.3 drops this system prompt
            assert m["content"] in untrained and all(m["content"] not in t for t in trained)


def test_prompt_completion_rows_train_the_completions_assistant_turns():
    tok = tokenizer("llama-3.1-8b-instruct")
    row = {"prompt": [SYSTEM, *CHAT[:3]], "completion": [CHAT[3], msg("user", "Hi"), msg("assistant", "Hello!")]}
    data = corept.train_on_responses_only([row], tok)
    assert runs(tok, data[0]["input_ids"], data[0]["assistant_masks"]) == ["See you.<|eot_id|>", "Hello!<|eot_id|>"]
    every = corept.train_on_responses_only([row], tok, train_on="all")[0]
    assert every["input_ids"] == data[0]["input_ids"] and set(every["assistant_masks"]) == {1}


def test_a_final_eos_after_the_conversation_is_no_end_of_turn():
    """A template that ends every rendering with EOS: earlier turns no longer render as prefixes, and
    the end-of-turn marker stays <|im_end|> (the final </s> is not the model's to produce)."""
    tok = tokenizer("qwen2.5-7b-instruct")
    tok.eos_token = "</s>"
    tok.chat_template = read_template("chatml") + "{%- if not add_generation_prompt %}{{ eos_token }}{% endif %}"
    data = tokenize_conversation(tok, [SYSTEM, *CHAT])
    assert tok.decode(data["input_ids"]).endswith("See you.<|im_end|>\n</s>")
    assert runs(tok, data["input_ids"], data["assistant_masks"]) == ["Hello!<|im_end|>", "See you.<|im_end|>"]


def test_turns_a_template_hides_are_reported():
    tok = tokenizer("gemma-2-9b-it")
    tok.chat_template = ("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<s>{{ m.role }}: "
                         "{{ m.content }}</s>{% endif %}{% endfor %}")  # drops earlier answers
    with pytest.raises(ChatTemplateError, match="cannot find assistant message 1 .*--train-on all"):
        tokenize_conversation(tok, CHAT)
    with pytest.raises(ChatTemplateError, match="needs conversations: a 'messages' column"):
        corept.train_on_responses_only([{"text": "Hi"}], tok)


def test_train_on_defaults_by_data_format():
    from datasets import Dataset

    assert [resolve_train_on(None, f) for f in ("messages", "prompt-completion", "text")] == \
        ["responses", "responses", "all"]
    with pytest.raises(corept.InvalidOptionsError, match="'text' rows have no responses"):
        resolve_train_on("responses", "text")
    strings = Dataset.from_list([{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    assert sft_training_data(strings, "prompt-completion", None, "responses") is strings  # TRL: the completion
    assert sft_training_data(strings, "prompt-completion", None, "all")[0] == {"text": "Q: 2+2?\nA: 4"}


@pytest.mark.parametrize("kw,message", [(dict(train_on="prompts"), "--train-on must be one of"),
                                        (dict(method="dpo", train_on="responses"), "--train-on applies to sft")])
def test_train_on_is_validated_with_the_options(tmp_path, kw, message):
    from corept.training.options import TrainOptions, finalize, validate

    with pytest.raises(corept.InvalidOptionsError, match=message):
        validate(finalize(TrainOptions(model="m", data="d", output=str(tmp_path / "out"), **kw), on_gpu=False))


def _sft_trainer(folder, data, tok, tmp_path, **config):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(folder)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, use_cpu=True,
                     report_to="none", save_strategy="no", shuffle_dataset=False, **config)
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)


CHATS = [[msg("system", "Be brief."), msg("user", f"Question {n}?"), msg("assistant", f"Answer {n}."),
          msg("user", "And then?"), msg("assistant", f"Then {n}.")] for n in range(4)]


@pytest.mark.parametrize("config", [dict(packing=True, packing_strategy="bfd", max_length=512),
                                    dict(padding_free=True, max_length=None)], ids=["packing-bfd", "padding-free"])
def test_trl_packed_batches_keep_the_mask(tiny_chat, tmp_path, config):
    """TRL packs the pre-tokenized rows into one sequence; its labels stay -100 off the assistant turns."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat)
    data = corept.train_on_responses_only([{"messages": c} for c in CHATS], tok)
    trainer = _sft_trainer(tiny_chat, data, tok, tmp_path, **config)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"][0] == 0).sum()) == len(CHATS)  # packed
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    trained = runs(tok, ids.tolist(), (labels != -100).tolist())
    assert sorted(trained) == sorted(f"{a}.<eos>" for n in range(4) for a in (f"Answer {n}", f"Then {n}"))
    assert torch.equal(labels[labels != -100], ids[labels != -100])


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_corept_train_trains_on_responses(tiny_chat, tmp_path, monkeypatch, packing):
    """``corept train --train-on responses`` on messages, with ``--template`` supplying a missing
    template: the labels of the batch TRL trains on are -100 outside the assistant turns. Packed (the
    default): one row of whole conversations, position ids restarting at each and the boundaries
    for the attention; ``--no-packing``: one padded row per conversation."""
    import corept.training.trainers as trainers
    from corept.cli import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_chat, folder)
    (folder / "chat_template.jinja").unlink()
    seen = []

    def build_trainer(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    real = trainers.build_trainer
    monkeypatch.setattr(trainers, "build_trainer", build_trainer)
    data = h.write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    out = tmp_path / "out"
    assert main(["train", "--model", str(folder), "--data", str(data), "--output", str(out), "--template", "chatml",
                 "--train-on", "responses", "--max-steps", "1", "--batch-size", "2", "--save-method", "lora",
                 "--max-new-tokens", "2", "--packing" if packing else "--no-packing"]) == 0
    batch = next(iter(seen[0].get_train_dataloader()))
    rows = list(zip(batch["input_ids"], batch["labels"]))
    if packing:
        (ids, labels), = rows
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert len(starts) == len(CHATS) and "attention_mask" not in batch
        assert batch["cu_seq_lens_q"].tolist() == starts + [len(ids)]
        rows = [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:] + [len(ids)])]
    else:
        assert len(rows) == 2 and "cu_seq_lens_q" not in batch
    for ids, labels in rows:
        ids, keep = ids.tolist(), (labels != -100).tolist()
        trained = runs(seen[0].processing_class, ids, keep)
        assert len(trained) == 2 and all(t.endswith(".<|im_end|>") for t in trained), trained
        assert trained[0].startswith("Answer ") and trained[1].startswith("Then ")
    assert (out / "adapter" / "chat_template.jinja").read_text() == read_template("chatml")
