"""Reward functions for ``corept train --method grpo``: a small built-in set, named on the command line.

TRL's ``GRPOTrainer`` calls each reward function as ``fn(prompts=..., completions=..., **columns)``
with one list entry per completion (``columns``: the dataset's other columns, repeated for every
completion of a prompt) and sums the rewards. A completion is a string, or for conversational
prompts a list holding the assistant message; :func:`completion_text` reads both.

Built-ins (``--reward NAME[=ARG]``, repeatable):

* ``exact_match``: 1.0 when the completion's answer equals the row's ``answer`` column, else 0.0.
  The completion's answer is the text inside its last ``<answer>...</answer>`` pair, else its last
  non-empty line; compared after trimming spaces, a trailing period and case. When ``answer`` is a
  number, the last number in that text is compared as a number.
* ``format[=REGEX]``: 1.0 when the whole completion (trimmed) matches ``REGEX`` (Python ``re``,
  ``DOTALL``), else 0.0. Default: ``<think>...</think>`` then ``<answer>...</answer>``.
* ``length[=N]``: ``1 - |tokens - N| / N`` clipped at -1, with tokens counted as whitespace-separated
  words of the completion (default ``N`` 50): a length target.
"""
from __future__ import annotations

import math
import re
from typing import Callable

from corept.errors import InvalidOptionsError

DEFAULT_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"
DEFAULT_LENGTH = 50
BUILT_IN = ("exact_match", "format", "length")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d+)*(?:\.\d+)?|\.\d+)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def completion_text(completion) -> str:
    """The text of one completion: a string, or the content of a conversational completion's messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in completion)
    return str(completion)


def extracted_answer(text: str) -> str:
    """The answer part of a completion: the last ``<answer>`` tag's content, else the last non-empty line."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _normalize(s: str) -> str:
    return s.strip().rstrip(".").strip().casefold()


def _number(s: str) -> float | None:
    found = _NUMBER.findall(s)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def answers_match(completion: str, answer) -> bool:
    """Whether ``completion``'s extracted answer equals ``answer`` (see the module notes)."""
    got = extracted_answer(completion)
    want = str(answer)
    target = _number(want) if _NUMBER.fullmatch(want.strip().replace(" ", "")) else None
    if target is not None:
        value = _number(got)
        return value is not None and math.isclose(value, target, rel_tol=0.0, abs_tol=1e-9)
    return _normalize(got) == _normalize(want)


def exact_match(completions, answer=None, **_):
    """1.0 per completion whose answer equals its row's ``answer``."""
    if answer is None:
        raise InvalidOptionsError("--reward exact_match needs an 'answer' column in the data")
    return [1.0 if answers_match(completion_text(c), a) else 0.0 for c, a in zip(completions, answer)]


def format_reward(pattern: str) -> Callable:
    """A reward: 1.0 per completion matching ``pattern`` as a whole (``re.DOTALL``)."""
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise InvalidOptionsError(f"--reward format={pattern!r}: not a valid regular expression ({exc})") from exc

    def format_match(completions, **_):
        return [1.0 if rx.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]

    return format_match


def length_reward(target: int) -> Callable:
    """A reward: ``max(-1, 1 - |words - target| / target)`` per completion."""
    def length(completions, **_):
        return [max(-1.0, 1.0 - abs(len(completion_text(c).split()) - target) / target) for c in completions]

    return length


def parse_reward(spec: str) -> Callable:
    """The reward function a ``--reward`` value names (``NAME`` or ``NAME=ARG``)."""
    name, _, arg = spec.partition("=")
    name = name.strip().replace("-", "_")
    if name == "exact_match":
        if arg:
            raise InvalidOptionsError("--reward exact_match takes no argument (it compares with the 'answer' column)")
        return exact_match
    if name == "format":
        return format_reward(arg or DEFAULT_FORMAT)
    if name == "length":
        try:
            target = int(arg) if arg else DEFAULT_LENGTH
        except ValueError:
            target = 0
        if target <= 0:
            raise InvalidOptionsError(f"--reward length={arg}: the target must be a positive number of words")
        return length_reward(target)
    raise InvalidOptionsError(f"--reward {spec!r}: unknown reward; built-in: {', '.join(BUILT_IN)} "
                              f"(format=REGEX and length=N take an argument)")


def default_rewards(columns) -> list[str]:
    """What ``corept train --method grpo`` uses without ``--reward``: the answer check when the data
    has an ``answer`` column, else the default format check."""
    return ["exact_match"] if "answer" in columns else ["format"]


def check_answers(dataset, source: str) -> None:
    """``exact_match`` needs a non-empty ``answer`` in every row; names the first row without one."""
    if "answer" not in dataset.column_names:
        raise InvalidOptionsError(f"{source}: --reward exact_match needs an 'answer' column (the expected answer "
                                  f"of each prompt); columns here: {dataset.column_names}")
    for i, value in enumerate(dataset["answer"]):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise InvalidOptionsError(f"{source}: row {i} has no 'answer' (exact_match compares each completion "
                                      f"with it)")


def resolve(specs, dataset, source: str) -> list[Callable]:
    """The reward functions of ``--reward`` specs (``None``: :func:`default_rewards`), checked against
    the data (``exact_match`` needs every row's ``answer``) before anything loads."""
    funcs = [parse_reward(spec) for spec in (specs or default_rewards(dataset.column_names))]
    if exact_match in funcs:
        check_answers(dataset, source)
    return funcs
