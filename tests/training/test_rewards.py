"""The built-in GRPO rewards (corept.training.rewards): what each pays for, and the errors they give."""
import pytest
from datasets import Dataset

from corept.errors import InvalidOptionsError
from corept.training import rewards as R


@pytest.mark.parametrize("completion,answer,paid", [
    ("Let me add: 2 + 3 = 5.\n<answer>5</answer>", "5", True),
    ("<answer> 5 </answer>", "5", True),
    ("<answer>4</answer> no wait <answer>5</answer>", "5", True),   # the last tag counts
    ("<answer>5</answer> no wait <answer>4</answer>", "5", False),
    ("The sum is\n5.", "5", True),                                  # no tag: the last line
    ("The sum is 5\nI am sure", "5", False),                        # ... which here holds no number
    ("<answer>5.0</answer>", "5", True),                             # numbers compare as numbers
    ("<answer>1,234</answer>", "1234", True),
    ("<answer>-7</answer>", "-7", True),
    ("<answer>7</answer>", "-7", False),
    ("<answer>Paris.</answer>", "paris", True),                      # text: trimmed, case-folded
    ("<answer>Lyon</answer>", "Paris", False),
    ("", "5", False),
])
def test_exact_match(completion, answer, paid):
    assert R.exact_match([completion], answer=[answer]) == [1.0 if paid else 0.0]


def test_conversational_completions_are_read():
    completions = [[{"role": "assistant", "content": "<answer>12</answer>"}],
                   [{"role": "assistant", "content": "<answer>13</answer>"}]]
    assert R.exact_match(completions, answer=["12", "12"]) == [1.0, 0.0]


def test_format_default_and_custom():
    default = R.parse_reward("format")
    assert default(["<think>hm</think> <answer>5</answer>", "<answer>5</answer>", "  <think>a\nb</think>\n"
                    "<answer>x</answer>  "]) == [1.0, 0.0, 1.0]
    tags = R.parse_reward(r"format=.*<answer>\s*-?\d+\s*</answer>.*")
    assert tags(["So <answer>12</answer>!", "<answer>twelve</answer>"]) == [1.0, 0.0]


def test_length_target():
    fn = R.parse_reward("length=4")
    assert fn(["a b c d", "a b", "a b c d e f g h i j k l"]) == [1.0, 0.5, -1.0]


@pytest.mark.parametrize("spec,match", [("bogus", "unknown reward"), ("format=(", "not a valid regular"),
                                        ("length=0", "positive"), ("length=x", "positive"),
                                        ("exact_match=3", "takes no argument")])
def test_bad_specs_say_what_is_wrong(spec, match):
    with pytest.raises(InvalidOptionsError, match=match):
        R.parse_reward(spec)


def test_answers_are_checked_row_by_row():
    with pytest.raises(InvalidOptionsError, match="needs an 'answer' column"):
        R.check_answers(Dataset.from_list([{"prompt": "q"}]), "d.jsonl")
    with pytest.raises(InvalidOptionsError, match="row 1 has no 'answer'"):
        R.check_answers(Dataset.from_list([{"prompt": "q", "answer": "1"}, {"prompt": "r", "answer": " "}]), "d.jsonl")
    with pytest.raises(InvalidOptionsError, match="needs an 'answer' column"):
        R.exact_match(["x"])
    assert R.default_rewards(["prompt", "answer"]) == ["exact_match"]
    assert R.default_rewards(["prompt"]) == ["format"]
