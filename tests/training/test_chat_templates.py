"""corept's named chat templates (``--template``): the standard format of each family, choosing,
overriding and the error when conversations meet a tokenizer without a template.

The expected renderings are written out by hand, and each shipped template must also agree with the
real tokenizer template of its family (``tests/data/chat_templates``) on a plain conversation.
"""
import shutil
from pathlib import Path

import pytest
import training_helpers as h

from corept.cli.train import EPILOG
from corept.tiny import tiny_tokenizer
from corept.training.chat_templates import ChatTemplateError, read_template, template_names, use_chat_template

REAL = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
#: family -> (bos_token, eos_token) of its real tokenizers
SPECIALS = {"llama-3": ("<|begin_of_text|>", "<|eot_id|>"), "chatml": ("<|im_start|>", "<|im_end|>"),
            "qwen3": ("<|im_start|>", "<|im_end|>"), "gemma": ("<bos>", "<eos>"), "mistral": ("<s>", "</s>")}
SYSTEM, U1, A1, U2 = "You are terse.", "Hi", "Hello!", "Bye"
CONVERSATION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": U1},
                {"role": "assistant", "content": A1}, {"role": "user", "content": U2}]
#: CONVERSATION rendered with the generation prompt, written out by hand in each family's format
EXPECTED = {
    "llama-3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    "qwen3": ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    "gemma": ("<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
              "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
    "mistral": "<s>[INST] You are terse.\n\nHi[/INST] Hello!</s>[INST] Bye[/INST]",
}
#: shipped template -> (real template file, whether the comparison keeps the system message)
FAMILY = {"chatml": ("qwen2.5-7b-instruct", True), "qwen3": ("qwen3-8b", True), "gemma": ("gemma-3-4b-it", True),
          "mistral": ("mistral-7b-instruct-v0.3", False)}


def tokenizer(family: str, template: str | None = None):
    """A tiny tokenizer with ``family``'s BOS/EOS strings (rendering only needs the strings)."""
    tok = tiny_tokenizer([SYSTEM, U1, A1, U2])
    tok.bos_token, tok.eos_token = SPECIALS[family]
    tok.chat_template = template
    return tok


def render(tok, messages, **kw) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_shipped_templates_are_listed_in_help():
    assert template_names() == ["chatml", "gemma", "llama-3", "mistral", "qwen3"]
    assert "chatml, gemma, llama-3, mistral, qwen3, or the path of a .jinja file" in " ".join(EPILOG.split())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_template_renders_the_family_format(name):
    tok = tokenizer(name, read_template(name))
    assert render(tok, CONVERSATION, add_generation_prompt=True) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_shipped_template_agrees_with_the_real_one(name):
    real, with_system = FAMILY[name]
    messages = CONVERSATION if with_system else CONVERSATION[1:]
    ours = render(tokenizer(name, read_template(name)), messages, add_generation_prompt=True)
    theirs = render(tokenizer(name, (REAL / f"{real}.jinja").read_text()), messages, add_generation_prompt=True)
    assert ours == theirs


def test_qwen3_renders_reasoning_and_tool_results():
    tok = tokenizer("qwen3", read_template("qwen3"))
    messages = [{"role": "user", "content": "6 x 7?"},
                {"role": "assistant", "content": "Let me check.", "reasoning_content": "Use the tool."},
                {"role": "tool", "content": "42"}, {"role": "tool", "content": "exact"},
                {"role": "assistant", "content": "<think>\nIt said 42.\n</think>\n\nIt is 42."}]
    assert render(tok, messages) == (
        "<|im_start|>user\n6 x 7?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nUse the tool.\n</think>\n\nLet me check.<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n42\n</tool_response>\n<tool_response>\nexact\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nIt said 42.\n</think>\n\nIt is 42.<|im_end|>\n")
    assert render(tok, messages[:1], add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>user\n6 x 7?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_template_replaces_the_tokenizers_own_and_reads_files(tmp_path):
    tok = tokenizer("gemma", (REAL / "gemma-2-9b-it.jinja").read_text())
    assert use_chat_template(tok) == (REAL / "gemma-2-9b-it.jinja").read_text()  # no --template: its own stays
    assert use_chat_template(tok, "GEMMA") == read_template("gemma")
    assert render(tok, CONVERSATION, add_generation_prompt=True) == EXPECTED["gemma"]  # the real one refuses system
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    use_chat_template(tok, str(path))
    assert render(tok, CONVERSATION[1:3]) == "[user] Hi\n[assistant] Hello!\n"


def test_unknown_names_and_missing_templates_say_what_to_do(tmp_path):
    with pytest.raises(ChatTemplateError, match="'llama2' is not a chat template corept ships; choose one of: "
                                                "chatml, gemma, llama-3, mistral, qwen3"):
        read_template("llama2")
    with pytest.raises(ChatTemplateError, match="cannot read the chat template file"):
        read_template(str(tmp_path / "absent.jinja"))
    tok = tokenizer("chatml")
    assert use_chat_template(tok, required=False) is None
    with pytest.raises(ChatTemplateError, match="the tokenizer of my-model has no chat template.*--template NAME.*"
                                                "chatml, gemma, llama-3, mistral, qwen3"):
        use_chat_template(tok, who="my-model")


def test_corept_train_refuses_conversations_without_a_template(tiny_chat, tmp_path, capsys):
    """Before the model loads and before --output is written: the error names the templates to choose."""
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_chat, folder)
    (folder / "chat_template.jinja").unlink()
    data = h.write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:3]}] * 2)
    out = tmp_path / "out"
    from corept.cli import main

    assert main(["train", "--model", str(folder), "--data", str(data), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "--template NAME" in err
    assert "chatml, gemma, llama-3, mistral, qwen3" in err
    assert not out.exists()
    assert main(["train", "--model", str(folder), "--data", str(data), "--output", str(out),
                 "--template", "vicuna"]) == 2
    assert "'vicuna' is not a chat template corept ships" in capsys.readouterr().err
    assert not out.exists()
