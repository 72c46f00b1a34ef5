"""The models and stacks of the end-to-end benchmark (bench/e2e.py).

Module level is standard library only: the driver reads :data:`MODELS`, :data:`VARIANTS` and
:data:`STACK_OF` without importing torch. Everything else runs inside one benchmark subprocess
(bench/e2e_worker.py), which loads this file by path (bench/ is never put on ``sys.path``: its
``kernels.py`` would shadow the ``kernels`` package that bitsandbytes and transformers probe for).

Every stack trains the same thing: LoRA r/alpha on the 7 projections, dropout 0, gradient
checkpointing, adapters initialised after ``torch.manual_seed(LORA_SEED)``, weights from the one
checkpoint that :func:`prepare` saved (random weights of a config-built model, fixed seed).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SEED = 3407
MARKER = "corept_e2e.json"

_LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=257, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.02)

# Public configs of the two 8B models (no network on the GPU machine), plus tiny twins for the CPU smoke.
MODELS: dict[str, dict] = {
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001, initializer_range=0.02),
    "qwen3-8b": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
        hidden_act="silu", attention_bias=False, tie_word_embeddings=False, use_sliding_window=False,
        sliding_window=None, max_window_layers=36, bos_token_id=151643, eos_token_id=151645,
        initializer_range=0.02),
    # mixture of experts (issue 24): LoRA on attention + the stacked experts (lora_targets)
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
        hidden_act="silu", attention_bias=False, tie_word_embeddings=False, use_sliding_window=False,
        sliding_window=None, max_window_layers=48, router_aux_loss_coef=0.001, bos_token_id=151643,
        eos_token_id=151645, initializer_range=0.02),
    "gpt-oss-20b": dict(
        model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_local_experts=32,
        num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
        max_position_embeddings=131072, sliding_window=128, rms_norm_eps=1e-5, attention_bias=True,
        tie_word_embeddings=False, swiglu_limit=7.0, router_aux_loss_coef=0.9, rope_theta=150000.0,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                          original_max_position_embeddings=4096, truncate=False),
        layer_types=["sliding_attention", "full_attention"] * 12, bos_token_id=199998, eos_token_id=200002,
        pad_token_id=199999, initializer_range=0.02),
    "tiny-qwen3-moe": dict(model_type="qwen3_moe", rope_theta=1000000.0, use_sliding_window=False, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[],
                           **_TINY),
    "tiny-llama": dict(model_type="llama", rope_theta=500000.0,
                       rope_scaling={**_LLAMA31_ROPE, "original_max_position_embeddings": 64}, **_TINY),
    "tiny-qwen3": dict(model_type="qwen3", rope_theta=1000000.0, use_sliding_window=False, **_TINY),
}

# The 8B configs cut to 2 decoder layers: every code path at the real widths, in seconds (gpu-check).
MODELS["llama-3.1-8b-2l"] = dict(MODELS["llama-3.1-8b"], num_hidden_layers=2)
MODELS["qwen3-8b-2l"] = dict(MODELS["qwen3-8b"], num_hidden_layers=2, max_window_layers=2)
# Qwen3-30B-A3B at half depth: the full model's 61 GB checkpoint does not fit the device machines'
# 64 GB disk beside the wheels. Every layer is the real one, so per-layer speed ratios between stacks
# hold; tok/s is about twice the 48-layer model's and memory is about half.
MODELS["qwen3-30b-a3b-24l"] = dict(MODELS["qwen3-30b-a3b"], num_hidden_layers=24, max_window_layers=24)

VARIANTS = ("hf", "hf_bf16", "liger", "unsloth", "corept", "hf_qlora", "unsloth_qlora", "corept_qlora",
            "corept_prev", "corept_qlora_prev", "corept_eager", "corept_qlora_eager", "corept_lean",
            "corept_qlora_lean")
# Which package set (PYTHONPATH) a variant runs with: base = wheels without unsloth; corept = corept's
# own packages + base; corept_prev = an earlier commit's corept + base (regression runs: both corept
# versions on one machine); unsloth = every wheel.
STACK_OF = {"hf": "base", "hf_bf16": "base", "liger": "base", "hf_qlora": "base",
            "corept": "corept", "corept_qlora": "corept", "unsloth": "unsloth", "unsloth_qlora": "unsloth",
            "corept_prev": "corept_prev", "corept_qlora_prev": "corept_prev",
            "corept_eager": "corept", "corept_qlora_eager": "corept",  # *_eager: corept.load(compile=False)
            "corept_lean": "corept", "corept_qlora_lean": "corept"}  # *_lean: use_gradient_checkpointing="corept"


#: LoRA on a mixture-of-experts model: the attention projections and the stacked expert weights
#: (peft's target_parameters), what corept.get_peft_model targets by default
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
#: attention implementation per model_type where sdpa cannot serve (gpt-oss: learned sink logits)
ATTENTION = {"gpt_oss": "eager"}


def is_moe(model: str) -> bool:
    c = MODELS[model]
    return bool(c.get("num_experts") or c.get("num_local_experts"))


def lora_targets(model: str) -> tuple[list[str], list[str]]:
    """``(target_modules, target_parameters)`` of ``model`` for every stack."""
    if is_moe(model):
        return LORA_TARGETS[:4], list(EXPERT_PARAMETERS)
    return list(LORA_TARGETS), []


def attention_of(model: str) -> str:
    return ATTENTION.get(MODELS[model]["model_type"], "sdpa")


def digest(model: str, seed: int, dtype: str) -> str:
    """Identity of a prepared checkpoint: config, seed and dtype."""
    blob = json.dumps({"config": MODELS[model], "seed": seed, "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def approx_bytes(model: str, dtype: str) -> int:
    """Size of ``model``'s checkpoint from its config (weights only), for the disk check."""
    c = MODELS[model]
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    attn = h * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    embed = c["vocab_size"] * h * (1 if c.get("tie_word_embeddings") else 2)
    mlp = 3 * h * i
    if is_moe(model):
        experts = c.get("num_experts") or c.get("num_local_experts")
        mlp = experts * 3 * h * (c.get("moe_intermediate_size") or i)
    return (embed + n * (attn + mlp + 2 * h)) * (4 if dtype == "fp32" else 2)


def is_prepared(folder: str, model: str, seed: int, dtype: str) -> bool:
    """True if ``folder`` holds the finished checkpoint of ``model`` for this seed and dtype."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as fh:
            return json.load(fh).get("digest") == digest(model, seed, dtype)
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- everything below runs in a worker

def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def make_config(model: str):
    """The transformers config of ``model`` from :data:`MODELS`."""
    from transformers import AutoConfig

    kw = copy.deepcopy(MODELS[model])  # transformers edits rope dicts in place
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def build_random(model: str, seed: int, device: str, dtype: str):
    """A randomly initialised causal LM built directly on ``device`` (seeded; sdpa attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(make_config(model), dtype=_torch_dtype(dtype),
                                             attn_implementation=attention_of(model))
    return m


def make_tokenizer(config):
    """A word-level tokenizer whose vocabulary is exactly ``config.vocab_size`` tokens.

    Tokens are ``<t{i}>``; bos/eos sit at the config's ids, a pad-named token and an unk at the two
    highest free ids, so no stack needs to add a token (which would resize the embeddings).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    v = config.vocab_size
    bos, eos = config.bos_token_id, config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    free = [i for i in range(v - 1, -1, -1) if i not in (bos, eos)]
    names = {bos: "<|bos|>", eos: "<|eos|>", free[0]: "<|pad|>", free[1]: "<|unk|>"}
    vocab = {names.get(i, f"<t{i}>"): i for i in range(v)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>")


def prepare(model: str, folder: str, seed: int, device: str, dtype: str) -> dict:
    """Save the seeded random ``model`` and a matching tokenizer to ``folder`` once (idempotent).

    The marker file is written last, so an interrupted save is redone on the next call.
    """
    import time

    import torch

    if is_prepared(folder, model, seed, dtype):
        return {"model": model, "folder": folder, "cached": True}
    marker = {"model": model, "seed": seed, "dtype": dtype, "digest": digest(model, seed, dtype)}
    t0 = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    m = build_random(model, seed, device, dtype)
    t1 = time.perf_counter()
    m.save_pretrained(folder)
    tok = make_tokenizer(m.config)
    assert len(tok) == m.config.vocab_size, (len(tok), m.config.vocab_size)
    tok.save_pretrained(folder)
    n = sum(p.numel() for p in m.parameters())
    del m
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as fh:
        json.dump(marker, fh)
    return {"model": model, "folder": folder, "cached": False, "params": n,
            "build_s": round(t1 - t0, 2), "save_s": round(time.perf_counter() - t1, 2)}


def import_stack(variant: str) -> None:
    """Import the variant's stack first (unsloth must precede transformers), before any memory cap."""
    if variant.startswith("unsloth"):
        import unsloth  # noqa: F401
    elif variant.startswith("corept"):
        import corept  # noqa: F401
        from corept.training.cuda_memory import prefer_expandable_segments

        prefer_expandable_segments()  # what `corept train` runs with (Unsloth sets its own at import)
    elif variant == "liger":
        import liger_kernel.transformers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    if "_qlora" in variant:
        import bitsandbytes  # noqa: F401


def _bnb_config(dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _hf_load(folder: str, device: str, dtype, quantized: bool, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=dtype, attn_implementation=attention)
    if quantized:
        kw["quantization_config"] = _bnb_config(dtype)
    if device == "cuda":
        kw["device_map"] = {"": 0}
    return AutoModelForCausalLM.from_pretrained(folder, **kw)


def _unsloth_targets(model: str) -> list[str]:
    """Unsloth names the experts' stacked weights among its target modules (its MoE LoRA path)."""
    modules, parameters = lora_targets(model)
    return modules + [p.rsplit(".", 1)[-1] for p in parameters]


def _hf_lora(model, rank: int, alpha: int, fp32_adapters: bool, targets=(LORA_TARGETS, [])):
    """peft LoRA the plain way: freeze, non-reentrant checkpointing, input grads, adapters."""
    import torch
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(LORA_SEED)
    modules, parameters = targets
    extra = {"target_parameters": list(parameters)} if parameters else {}
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(modules), bias="none", **extra,
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg, autocast_adapter_dtype=fp32_adapters)


_LIGER = {"llama": "apply_liger_kernel_to_llama", "qwen3": "apply_liger_kernel_to_qwen3"}


def setup(variant: str, model_name: str, folder: str, *, device: str, dtype: str, max_seq: int,
          rank: int, alpha: int, weights: str = "checkpoint", seed: int = 0):
    """Load ``model_name`` the way ``variant`` does and add its LoRA adapters.

    :param weights: ``"checkpoint"`` (every variant reads ``folder``) or ``"config"`` (hf, hf_bf16
        and liger rebuild the same seeded random weights from the config on the device instead).
    :returns: ``(peft model in train mode, autocast dtype or None, info dict for the record)``.
    """
    import torch

    tdt = _torch_dtype(dtype)
    quant = "_qlora" in variant  # corept_qlora_prev too
    autocast = None
    info: dict = {"weights": "checkpoint"}
    if variant in ("hf", "hf_bf16", "liger", "hf_qlora"):
        if variant == "liger":
            import liger_kernel.transformers as lk

            mt = MODELS[model_name]["model_type"]
            getattr(lk, _LIGER[mt])(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                   fused_linear_cross_entropy=True)
        if weights == "config" and not quant:
            model = build_random(model_name, seed, device, dtype)
            info["weights"] = "config"
        else:
            model = _hf_load(folder, device, tdt, quant, attention_of(model_name))
        # hf / liger / hf_qlora: adapters in the model dtype (bf16 throughout); hf_bf16: as the HF
        # Trainer runs it, fp32 adapters (peft's default) and the forward under bf16 autocast.
        model = _hf_lora(model, rank, alpha, fp32_adapters=(variant == "hf_bf16"), targets=lora_targets(model_name))
        if variant == "hf_bf16" and device == "cuda":
            autocast = torch.bfloat16
    elif variant in ("unsloth", "unsloth_qlora"):
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=folder, max_seq_length=max_seq, dtype=tdt,
                                                     load_in_4bit=quant, load_in_16bit=not quant,
                                                     full_finetuning=False, use_exact_model_name=True)
        model = FastLanguageModel.get_peft_model(model, r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=_unsloth_targets(model_name), bias="none",
                                                 use_gradient_checkpointing="unsloth", random_state=LORA_SEED,
                                                 max_seq_length=max_seq)
        if hasattr(FastLanguageModel, "for_training"):
            FastLanguageModel.for_training(model)
    elif variant.startswith("corept"):
        import corept

        extra = {"compile": False} if variant.endswith("_eager") else {}
        model, _ = corept.load(folder, max_seq_length=max_seq, dtype=tdt, load_in_4bit=quant, **extra)
        # corept's defaults (checkpointing "auto", layers compiled on CUDA) unless the variant names one;
        # *_prev variants (an earlier corept) get its lean mode, which every earlier commit had
        ckpt = {"use_gradient_checkpointing": "corept"} if variant.endswith(("_lean", "_prev")) else {}
        modules, parameters = lora_targets(model_name)
        if parameters:
            ckpt["target_parameters"] = parameters
        model = corept.get_peft_model(model, r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                      target_modules=modules, random_state=LORA_SEED, **ckpt)
        rep = corept.report(model)
        info["corept_applied"] = dict(rep.applied)
        info["corept_fallbacks"] = dict(rep.fallbacks)
        info["corept_settings"] = dict(rep.settings)
    else:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    model.train()
    n4 = sum(1 for m in model.modules() if type(m).__module__.startswith("bitsandbytes") and "4bit" in type(m).__name__)
    if quant and n4 == 0:  # e.g. unsloth drops 4-bit silently when bitsandbytes fails to import
        raise RuntimeError(f"{variant}: no 4-bit linear layer after loading: the stack fell back to 16-bit")
    info["linear4bit_modules"] = n4
    trainable = [p for p in model.parameters() if p.requires_grad]
    info.update(trainable_params=sum(p.numel() for p in trainable),
                lora_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in trainable}),
                autocast=str(autocast).replace("torch.", "") if autocast else None,
                attn_implementation=getattr(getattr(model, "config", None), "_attn_implementation", None))
    return model, autocast, info
