"""Tiny random transformers models, configs and tokenizers for the core tests (CPU, offline).

Every config is hidden 64, 2 layers, GQA 4 query / 2 key-value heads, a vocabulary of 257 (not a
power of two) and, where the config class allows it, ``head_dim`` 32 != hidden / heads (16).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

VOCAB = 257
HIDDEN = 64
HEAD_DIM = 32  # != HIDDEN // 4 on purpose

# model_type -> plugin that must own it (what corept.report(model).plugin says)
PLUGIN_OF = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen", "qwen3": "qwen", "qwen3_moe": "qwen",
             "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma"}
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "corept patches transformers models with Triton kernels.",
    "Hello world! Fine-tuning tiny models on a CPU is fast.",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "0 1 2 3 4 5 6 7 8 9 abc def ghi jkl mno pqr stu vwx yz",
]


def tiny_config(model_type: str, **overrides):
    """A tiny config of ``model_type`` (see the module docstring for its shape)."""
    import transformers as tf

    kw = dict(_COMMON)
    if model_type == "llama":
        cls = tf.LlamaConfig
        kw.update(head_dim=HEAD_DIM)
    elif model_type == "mistral":
        cls = tf.MistralConfig
        kw.update(head_dim=HEAD_DIM, sliding_window=None)
    elif model_type == "qwen2":
        cls = tf.Qwen2Config  # no head_dim field: hidden / heads
    elif model_type == "qwen3":
        cls = tf.Qwen3Config
        kw.update(head_dim=HEAD_DIM)
    elif model_type == "qwen3_moe":
        cls = tf.Qwen3MoeConfig
        kw.update(head_dim=HEAD_DIM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  decoder_sparse_step=1)
    elif model_type == "gemma":
        cls = tf.GemmaConfig
        kw.update(head_dim=HEAD_DIM)
    elif model_type == "gemma2":
        cls = tf.Gemma2Config
        kw.update(head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=4,
                  final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    elif model_type == "gemma3_text":
        cls = tf.Gemma3TextConfig
        kw.update(head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"])
    elif model_type == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128,
                             bos_token_id=1, eos_token_id=2, **overrides)
    elif model_type == "phi3":
        cls = tf.Phi3Config
    else:
        raise ValueError(f"tests/tiny.py has no tiny config for {model_type!r}")
    kw.update(overrides)
    return cls(**kw)


def tiny_config_of(model_type: str, **overrides):
    """A tiny config of any ``model_type`` transformers knows (:func:`corept.tiny.tiny_config`)."""
    from corept.tiny import tiny_config as build

    return build(model_type, **overrides)


def tiny_model(model_type: str, *, seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised tiny causal LM (eval mode, fp32 by default).

    Gemma norms are zero-initialised (``1 + w``) and would hide a missing offset, so every norm
    weight is perturbed; every parameter is random.
    """
    return tiny_model_from(tiny_config(model_type, **overrides), seed=seed, dtype=dtype)


def tiny_model_from(config, *, seed: int = 0, dtype=torch.float32):
    """:func:`tiny_model` for a given config."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_tokenizer():
    """A byte-level BPE trained on :data:`TEXTS` (vocab <= :data:`VOCAB`), as PreTrainedTokenizerFast.

    It has bos/eos/unk but deliberately no pad token (corept.load must set one).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny(folder: os.PathLike, model_type: str, *, seed: int = 0, **overrides) -> Path:
    """Save a tiny model (safetensors) and the tiny tokenizer into ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(model_type, seed=seed, **overrides).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def hf_cache_repo(cache_dir: os.PathLike, repo_id: str, model_type: str, *, commit: str = "0" * 40,
                  **overrides) -> Path:
    """Lay out ``repo_id`` in a Hugging Face hub cache the way huggingface_hub writes it.

    ``<cache>/models--{org}--{name}/refs/main`` holds the commit hash, the files live in
    ``snapshots/<commit>/`` (huggingface_hub stores blobs under ``blobs/`` and symlinks them from
    the snapshot; plain files in the snapshot are what ``local_files_only`` lookups read).
    :returns: the snapshot folder.
    """
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    save_tiny(snapshot, model_type, **overrides)
    blobs = repo_dir / "blobs"
    blobs.mkdir(exist_ok=True)
    # Move every file into blobs/ and symlink it back, as the real cache does.
    for f in sorted(snapshot.iterdir()):
        if f.is_file() and not f.is_symlink():
            blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
            f.rename(blob)
            f.symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def batch(vocab: int = VOCAB, *, b: int = 2, s: int = 8, seed: int = 1):
    """``(input_ids, labels)`` of shape ``[b, s]``; labels have ignored (-100) positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100
    return ids, labels


def config_json(folder: os.PathLike) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def mismatch(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 1e-4, atol: float = 1e-5) -> str | None:
    """``None`` when the tensors are close (torch.testing.assert_close), else its message."""
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as exc:
        return str(exc)
    return None


def instance_overrides(model: torch.nn.Module) -> list[str]:
    """Names of modules carrying an instance attribute corept could have set (forward, corept*)."""
    found = []
    for name, m in model.named_modules():
        keys = [k for k in m.__dict__ if k == "forward" or "corept" in k.lower()]
        if keys:
            found.append(f"{name or '<root>'}: {keys}")
    return found
