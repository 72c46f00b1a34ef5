"""Loss on the assistant turns only, for any chat template (no ``{% generation %}`` markers needed).

**What is trained.** For each assistant message, the text the model has to produce after the prompt
it would be given at inference: from the end of the generation prompt
(``apply_chat_template(messages[:i], add_generation_prompt=True)``, so role headers such as
``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` or ``<start_of_turn>model\\n`` get no loss)
through the turn's end-of-turn marker (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ``</s>``:
trained, so the model learns to stop; whitespace a template writes after it, between turns, is
not). System, user and tool messages get no loss; every assistant turn of a conversation does
(with prompt/completion rows, every assistant turn of the completion).

**How the turns are found** (:func:`assistant_spans`). The conversation is rendered once. A turn
starts where the rendering of ``messages[:i]`` with the generation prompt ends and ends where that
of ``messages[:i + 1]`` does (cut after its end-of-turn marker), provided both are prefixes of the
full rendering. Some templates render a message differently depending on what follows it (Qwen3
gives an empty reasoning block only to turns after the last user query; Mistral v0.3 moves the
system prompt into the last user message). For such a turn, its content is located by rendering the
conversation again with only that content replaced (the two renderings differ exactly where it
sits) and the end-of-turn marker, learnt from a one-turn probe conversation, is looked up after it.
A turn neither way finds raises :class:`ChatTemplateError`, naming the template and the message.

**Tokens.** The full text is tokenized once, with ``add_special_tokens=False`` (the template writes
BOS itself, as in ``apply_chat_template``) and character offsets; a token is trained when its
characters overlap an assistant span (so a token joining the space before an answer to its first
word is trained). This needs a fast tokenizer.

**How the mask reaches TRL.** :func:`train_on_responses_only` returns a pre-tokenized dataset,
``input_ids`` + ``assistant_masks`` (1 = trained). TRL 1.16's ``SFTTrainer`` sees ``input_ids``
and does not tokenize again; it folds ``assistant_masks`` into ``labels`` (-100 where 0) whatever
``assistant_only_loss`` says (leave that ``False``: it asks for generation markers and raw
conversations), truncates rows to ``max_length`` and drops rows left without a trained token.
Packing (``packing=True, packing_strategy="bfd"``) and ``padding_free=True`` carry those
per-token ``labels`` into the packed rows, so a packed batch keeps -100 on every non-assistant token.
"""
from __future__ import annotations

import json

from corept.errors import InvalidOptionsError
from corept.training.chat_templates import ChatTemplateError, is_conversational, template_names, use_chat_template

#: ``--train-on`` values: the assistant turns (or a string completion) only, or every token
TRAIN_ON = ("responses", "all")
#: stands in for one message's content while locating it (a private-use character no text holds)
SENTINEL = "\ue000"
#: characters compared when aligning an inference prompt with a rendering that differs from it
MATCH = 256


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or "the tokenizer"


def _render(tokenizer, messages: list, generation_prompt: bool, template_kwargs: dict) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         **template_kwargs)


def _after_sentinel(tokenizer, messages: list, template_kwargs: dict) -> str | None:
    try:
        text = _render(tokenizer, messages, False, template_kwargs)
    except Exception:  # noqa: BLE001 - a template may refuse a probe; spans are then found by prefixes only
        return None
    return text.split(SENTINEL, 1)[1] if SENTINEL in text else None


def end_of_turn(tokenizer, **template_kwargs) -> str:
    """The marker a template writes after an assistant message's content (``"<|im_end|>"``): what follows
    the answer of a probe conversation both where it ends the conversation and where a user turn follows
    (text a template adds at the very end, such as a final EOS, is left out); ``""`` when there is none."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]
    ending = _after_sentinel(tokenizer, probe, template_kwargs)
    followed = _after_sentinel(tokenizer, [*probe, {"role": "user", "content": "Hi"}], template_kwargs)
    if ending is None:
        return ""
    marker = ending if followed is None else ending[:_shared(ending, followed)]
    if marker != ending and any(c.isspace() for c in marker):  # they part inside the closing text: cut there
        marker = marker[:max(i for i, c in enumerate(marker) if c.isspace())]
    return marker.strip()


def _rendered(tokenizer, messages: list, generation_prompt: bool, kwargs: dict) -> str | None:
    """``messages`` rendered, or ``None`` when the template refuses a partial conversation (e.g. one
    without a user turn)."""
    try:
        return _render(tokenizer, messages, generation_prompt, kwargs)
    except Exception:  # noqa: BLE001 - the turn is then located by its content
        return None


def _shared(a: str, b: str, *, ending: bool = False) -> int:
    """Length of the longest common prefix (``ending``: suffix) of ``a`` and ``b`` (binary search on
    slice equality, which runs at C speed)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        same = a[len(a) - mid:] == b[len(b) - mid:] if ending else a[:mid] == b[:mid]
        lo, hi = (mid, hi) if same else (lo, mid - 1)
    return lo


def _prompt_end(full: str, head: str, lo: int, hi: int) -> int:
    """Where the inference prompt ``head`` ends in ``full[lo:hi]`` when ``full`` renders it differently:
    the position whose preceding text shares the longest ending with ``head`` (the latest of equals)."""
    best, best_len = hi, 0
    for k in range(hi, lo, -1):
        n = best_len + 1  # only a longer shared ending moves the choice
        if n <= min(k - lo, len(head), MATCH) and full[k - n:k] == head[-n:]:
            best, best_len = k, _shared(full[max(lo, k - MATCH):k], head[-MATCH:], ending=True)
    return best


def _content_bounds(tokenizer, messages: list, i: int, full: str, kwargs: dict) -> tuple[int, int] | None:
    """Where message ``i``'s content sits in ``full``: the region that changes when only it changes."""
    if not isinstance(messages[i].get("content"), str):
        return None
    probe = [*messages[:i], {**messages[i], "content": SENTINEL}, *messages[i + 1:]]
    other = _render(tokenizer, probe, False, kwargs)
    if other == full:
        return None
    start = _shared(full, other)
    return start, len(full) - _shared(full[start:], other[start:], ending=True)


def _unlocatable(tokenizer, i: int, why: str) -> ChatTemplateError:
    return ChatTemplateError(
        f"cannot find assistant message {i} in the rendering of {_name(tokenizer)}'s chat template: {why}. "
        f"Use --train-on all (library: train_on='all'), or a template whose turns render the same whatever "
        f"follows them: --template NAME, one of {', '.join(template_names())}")


def assistant_spans(tokenizer, messages: list, *, trained: list[int] | None = None, closing: str | None = None,
                    **template_kwargs) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each trained assistant turn in it.

    :param trained: indices of the messages to train (default: every assistant message).
    :param closing: the end-of-turn marker (default: :func:`end_of_turn`, pass it to save a render).
    :param template_kwargs: passed to ``apply_chat_template`` (``tools``, ``enable_thinking``, ...).
    :returns: ``(text, [(start, end), ...])``, spans in order; a turn rendering no text has none.
    :raises ChatTemplateError: a turn that neither prefix rendering nor its content locates.
    """
    kw = template_kwargs
    full = _render(tokenizer, messages, False, kw)
    if trained is None:
        trained = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if closing is None:
        closing = end_of_turn(tokenizer, **kw)
    spans: list[tuple[int, int]] = []
    for i in trained:
        head = _rendered(tokenizer, messages[:i], True, kw)
        upto = _rendered(tokenizer, messages[:i + 1], False, kw)
        start = len(head) if head is not None and full.startswith(head) else None
        stop = len(upto) if upto is not None and full.startswith(upto) else None
        content = None
        if start is None or stop is None:
            content = _content_bounds(tokenizer, messages, i, full, kw)
            if content is None:
                raise _unlocatable(tokenizer, i, "it renders differently when it ends the conversation, and changing "
                                                 "its content changes nothing in the text")
            if start is None:
                lo = spans[-1][1] if spans else 0
                start = _prompt_end(full, head, lo, content[0]) if head else content[0]
        if stop is not None:
            turn = full[start:stop]
            cut = turn.rfind(closing) if closing else -1
            end = start + (cut + len(closing) if cut >= 0 else len(turn.rstrip()))
        else:
            at = full.find(closing, content[1]) if closing else -1
            if at < 0:
                raise _unlocatable(tokenizer, i, "it renders differently when it ends the conversation, and no "
                                                 "end-of-turn marker follows its content")
            end = at + len(closing)
        if spans and start < spans[-1][1]:
            raise _unlocatable(tokenizer, i, f"its text would start at character {start}, inside the previous "
                                             f"assistant turn")
        if end > start:
            spans.append((start, end))
    return full, spans


def token_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """``(input_ids, mask)`` of ``text``: mask 1 on each token whose characters overlap a span.

    :raises ChatTemplateError: a slow (Python) tokenizer, which has no character offsets.
    """
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise ChatTemplateError(f"{_name(tokenizer)}: assistant-only loss needs a fast tokenizer (a tokenizer.json) "
                                f"for character offsets; load it with use_fast=True, or use --train-on all") from exc
    mask, j = [], 0
    for a, b in enc["offset_mapping"]:
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        mask.append(int(j < len(spans) and spans[j][0] < max(b, a + 1) and a < spans[j][1]))
    return list(enc["input_ids"]), mask


def tokenize_conversation(tokenizer, messages: list, *, train_on: str = "responses", first: int = 0,
                          closing: str | None = None, **template_kwargs) -> dict:
    """``{"input_ids", "assistant_masks"}`` of one conversation.

    :param train_on: ``"responses"`` (assistant turns from message ``first`` on) or ``"all"``.
    """
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # datasets fills absent keys
    if train_on == "all":
        ids, _ = token_mask(tokenizer, _render(tokenizer, messages, False, template_kwargs), [])
        return {"input_ids": ids, "assistant_masks": [1] * len(ids)}
    trained = [i for i, m in enumerate(messages) if i >= first and m.get("role") == "assistant"]
    text, spans = assistant_spans(tokenizer, messages, trained=trained, closing=closing, **template_kwargs)
    ids, mask = token_mask(tokenizer, text, spans)
    return {"input_ids": ids, "assistant_masks": mask}


def _template_kwargs(row: dict) -> dict:
    """TRL's optional per-row template inputs: ``tools`` (a list or its JSON) and ``chat_template_kwargs``."""
    kwargs = dict(row.get("chat_template_kwargs") or {})
    tools = row.get("tools")
    if tools:
        kwargs["tools"] = json.loads(tools) if isinstance(tools, str) else tools
    return kwargs


def train_on_responses_only(dataset, tokenizer, *, train_on: str = "responses", num_proc: int | None = None):
    """A tokenized dataset for TRL's ``SFTTrainer`` whose loss falls on the assistant turns only.

    :param dataset: a ``datasets.Dataset`` (or a list of rows) with a ``messages`` column, or
        ``prompt`` + ``completion`` columns holding messages (then only the completion's assistant
        turns are trained); optional ``tools`` / ``chat_template_kwargs`` columns reach the template.
    :param tokenizer: a fast tokenizer with a chat template (see
        :func:`corept.training.chat_templates.use_chat_template` to give it one).
    :param train_on: ``"responses"`` or ``"all"`` (every token, same tokenization).
    :returns: a ``Dataset`` of ``input_ids`` and ``assistant_masks`` (the module docstring says how
        TRL turns them into labels, packing included).
    :raises ChatTemplateError: no chat template, or a turn the template hides (named).
    """
    from datasets import Dataset

    if train_on not in TRAIN_ON:
        raise InvalidOptionsError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if isinstance(dataset, list):
        dataset = Dataset.from_list(dataset)
    row = dataset[0]
    split = not isinstance(row.get("messages"), list)
    if split and not (isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list)):
        raise ChatTemplateError(f"train_on_responses_only needs conversations: a 'messages' column, or 'prompt' and "
                                f"'completion' columns of messages; got columns {dataset.column_names}")
    use_chat_template(tokenizer, required=True, who=_name(tokenizer))
    closing = end_of_turn(tokenizer)

    def encode(row):
        messages, first = (row["prompt"] + row["completion"], len(row["prompt"])) if split else (row["messages"], 0)
        return tokenize_conversation(tokenizer, messages, train_on=train_on, first=first, closing=closing,
                                     **_template_kwargs(row))

    return dataset.map(encode, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc=f"Tokenizing conversations (train on {train_on})")


def resolve_train_on(train_on: str | None, fmt: str) -> str:
    """The ``--train-on`` of an sft run on data of format ``fmt`` (:mod:`corept.training.data`).

    Default ``responses``: the assistant turns of conversations, the completion of prompt/completion
    strings; ``text`` rows have no responses and train on everything.
    """
    if train_on is not None and train_on not in TRAIN_ON:
        raise InvalidOptionsError(f"--train-on must be one of {TRAIN_ON}, got {train_on!r}")
    if fmt == "text":
        if train_on == "responses":
            raise InvalidOptionsError("--train-on responses needs conversations ('messages') or prompt/completion "
                                      "rows; 'text' rows have no responses: use --train-on all")
        return "all"
    return train_on or "responses"


def sft_training_data(dataset, fmt: str, tokenizer, train_on: str):
    """The dataset ``corept train`` hands TRL's ``SFTTrainer`` for ``--train-on`` (already resolved).

    Conversations: tokenized here (:func:`train_on_responses_only`). Prompt/completion strings: TRL's
    own completion-only loss for ``responses``, one ``text`` column for ``all``. Text: unchanged.
    """
    if is_conversational(dataset):
        return train_on_responses_only(dataset, tokenizer, train_on=train_on)
    if fmt == "prompt-completion" and train_on == "all":
        return dataset.map(lambda r: {"text": r["prompt"] + r["completion"]}, remove_columns=["prompt", "completion"])
    return dataset
