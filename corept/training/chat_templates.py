"""Chat templates: the tokenizer's own, or one of corept's named templates (``--template NAME``).

A conversation (``messages`` rows, or prompt/completion rows holding messages) is rendered with the
tokenizer's chat template. Base models usually have none, and a fine-tune may want another format,
so corept ships Jinja templates of the common instruct formats as package data,
``corept/data/chat_templates/NAME.jinja`` (written for corept; each renders its family's standard
format, see the comment at the top of each file):

* ``chatml`` (Qwen2/2.5, SmolLM2, many fine-tunes), ``qwen3`` (ChatML with reasoning blocks),
  ``llama-3``, ``gemma`` (2 and 3), ``mistral`` (v3 tokenizer, Mistral-7B-Instruct-v0.3).

:func:`template_names` lists them, :func:`read_template` reads one by name (or any Jinja file by
path) and :func:`use_chat_template` puts it on a tokenizer, replacing the tokenizer's own: the
template is then saved with the tokenizer, so inference and GGUF export use the format the model
was trained in. :func:`check_chat_template` fails early, before a model loads, when conversations
meet a tokenizer without a template and no ``--template`` was given.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from corept.errors import InvalidOptionsError

SUFFIX = ".jinja"
#: message-valued columns of TRL's conversational formats (sft, dpo, kto)
CONVERSATION_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")


class ChatTemplateError(InvalidOptionsError):
    """A chat template is missing, unknown, unreadable, or cannot locate the assistant turns."""


def _folder():
    return resources.files("corept") / "data" / "chat_templates"


def template_names() -> list[str]:
    """Names of corept's shipped chat templates (sorted), e.g. ``["chatml", "gemma", ...]``."""
    return sorted(p.name[: -len(SUFFIX)] for p in _folder().iterdir() if p.name.endswith(SUFFIX))


def _choices() -> str:
    return ", ".join(template_names())


def read_template(name_or_path: str) -> str:
    """The Jinja source of a shipped template (by name, any case) or of a ``.jinja`` file (by path).

    :raises ChatTemplateError: an unknown name (the shipped names are listed) or an unreadable file.
    """
    text = str(name_or_path).strip()
    if text.lower() in template_names():
        return (_folder() / f"{text.lower()}{SUFFIX}").read_text(encoding="utf-8")
    path = Path(text).expanduser()
    if text.endswith(SUFFIX) or path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ChatTemplateError(f"--template {text}: cannot read the chat template file "
                                    f"({exc.strerror or exc}); give a readable .jinja file or one of: "
                                    f"{_choices()}") from exc
    raise ChatTemplateError(f"--template {text!r} is not a chat template corept ships; choose one of: "
                            f"{_choices()}, or give the path of a .jinja file")


def missing_template_error(who: str) -> ChatTemplateError:
    """The error for conversations meeting a tokenizer without a chat template."""
    return ChatTemplateError(f"the tokenizer of {who} has no chat template, so its conversations cannot be "
                             f"rendered: pass --template NAME in the format the model was (or is to be) trained "
                             f"in, one of: {_choices()} (or the path of a .jinja file); in Python, "
                             f"corept.training.chat_templates.use_chat_template(tokenizer, NAME)")


def use_chat_template(tokenizer, template: str | None = None, *, required: bool = True,
                      who: str = "this model"):
    """Put ``template`` (a shipped name or a ``.jinja`` path) on ``tokenizer``, replacing its own.

    Without ``template`` the tokenizer keeps its own template.

    :param required: raise when the tokenizer ends up without a template (conversational data).
    :param who: the model, as named in the error.
    :returns: the tokenizer's chat template afterwards (``None`` when it has none).
    :raises ChatTemplateError: unknown ``template``, or no template at all while ``required``.
    """
    if template is not None:
        tokenizer.chat_template = read_template(template)
    if required and not getattr(tokenizer, "chat_template", None):
        raise missing_template_error(who)
    return getattr(tokenizer, "chat_template", None)


def is_conversational(dataset) -> bool:
    """Whether the rows hold conversations (row 0 has a message-list column), so a template is needed."""
    row = dataset[0]
    return any(isinstance(row.get(column), list) for column in CONVERSATION_COLUMNS)


def check_chat_template(folder: str, template: str | None, dataset, *, who: str) -> None:
    """Before the model loads: conversational ``dataset`` needs ``template`` or a template in ``folder``.

    Reads only the tokenizer (``template`` itself is checked with the options, by :func:`read_template`).

    :raises ChatTemplateError: naming the shipped templates (see :func:`missing_template_error`).
    """
    if template is not None or not is_conversational(dataset):
        return
    from corept.loading.loader import load_tokenizer

    tokenizer = load_tokenizer(folder, trust_remote_code=False, max_seq_length=1)
    if tokenizer is not None:  # no tokenizer at all is reported when the model loads
        use_chat_template(tokenizer, required=True, who=who)
