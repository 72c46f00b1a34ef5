"""Models, adapters and batches for the conformance kit: every patched model has a live twin.

Each check builds a *patched* model and an *unpatched reference* from the same fp32 base (by
``deepcopy``), gives both the same LoRA adapters, quantization and checkpointing, and runs both on
the same batch. Nothing is compared against stored numbers.
"""
from __future__ import annotations

import copy
import zlib
from pathlib import Path

import torch
import torch.nn as nn

import corept
from corept.loading import disable_cpu_4bit_repack
from corept.lora.setup import default_targets
from corept.registry.manager import get_plugin_manager
from corept.registry.resolution import resolve
from corept.training.checkpointing import enable_checkpointing

PAD_ID = 0


def architecture_of(config):
    """The :class:`~corept.ResolvedArchitecture` claiming ``config.model_type`` (AssertionError if none)."""
    arch = resolve(config, warn=False)
    if arch is None:
        installed = sorted(get_plugin_manager().model_types())
        raise AssertionError(f"no installed corept plugin claims model_type {config.model_type!r}; "
                             f"claimed: {installed}")
    return arch


def forced_attention(config) -> str | None:
    """The attention implementation the owning architecture forces (as ``corept.load`` would)."""
    return architecture_of(config).load.forced_attn_implementation


def model_class(name: str | None):
    """A transformers model class by name (``None``: ``AutoModelForCausalLM``)."""
    import transformers

    return getattr(transformers, name or "AutoModelForCausalLM")


def build_base(config, class_name: str | None = None, seed: int = 0) -> nn.Module:
    """A randomly initialised fp32 model in eval mode, with the architecture's forced attention.

    Every 1-D parameter (norm weights, biases) gets noise of std 0.1: transformers initialises
    biases to 0 and Gemma norms to 0 (``1 + w``), which would hide a dropped bias or a wrong norm
    offset. So do stacked biases (``*_bias`` of 2-D or more: a mixture-of-experts layer's per-expert
    biases), from a generator of their own so the 1-D values stay what they were.
    """
    config = copy.deepcopy(config)
    attn = forced_attention(config)
    torch.manual_seed(seed)
    cls = model_class(class_name)
    kwargs = {"attn_implementation": attn} if attn else {}
    # Auto classes have from_config; concrete model classes (multimodal ones, say) _from_config
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    model = build(config, dtype=torch.float32, **kwargs)
    gen, stacked = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith("_bias"):
                p.add_(torch.randn(p.shape, generator=stacked) * 0.1)
    return model.eval()


def vocab_size(model: nn.Module) -> int:
    return model.config.get_text_config().vocab_size


def make_batch(vocab: int, batch: int, seq: int, seed: int = 1) -> dict:
    """``input_ids``, ``attention_mask`` and ``labels`` ``[batch, seq]``.

    Row 0 is left-padded (2 tokens), row 1 right-padded (2 tokens), other rows unpadded; labels are
    ``-100`` on padding and on one more position of row 0.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    if batch > 1:
        mask[1, -2:] = 0
    ids = ids.masked_fill(mask == 0, PAD_ID)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, seq // 2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def generation_batch(vocab: int, batch: int, seq: int, seed: int = 2) -> dict:
    """Prompts for greedy generation: row 0 left-padded by 2, the others full."""
    b = make_batch(vocab, batch, seq, seed)
    mask = torch.ones_like(b["attention_mask"])
    mask[0, :2] = 0
    return {"input_ids": b["input_ids"].masked_fill(mask == 0, PAD_ID), "attention_mask": mask}


# -- LoRA ---------------------------------------------------------------------------------------------
def lora_targets(model: nn.Module, arch) -> list[str]:
    """The LoRA targets ``corept.get_peft_model`` defaults to for ``model`` (the same for the reference)."""
    targets = default_targets(model, arch)
    if targets == "all-linear":
        raise AssertionError(f"no linear layer inside the {arch.model_type} attention/MLP modules to put LoRA on")
    return targets


def randomize_lora(model: nn.Module, seed: int) -> None:
    """Give every ``lora_A``/``lora_B`` weight deterministic random values (std 0.1) derived from its
    name, so two models get identical adapters (peft initialises ``B`` to 0: ``A`` would get no
    gradient)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(p.dtype))


def add_lora(model: nn.Module, *, patched: bool, targets: list[str], rank: int, checkpointing: bool,
             seed: int = 7) -> nn.Module:
    """LoRA through ``corept.get_peft_model`` (patched) or plain peft (reference), on ``targets`` and,
    for a mixture-of-experts model, on its stacked expert weights (``target_parameters``).

    The reference gets transformers' own non-reentrant gradient checkpointing when asked; the
    patched model gets corept's (``"corept"`` mode).
    """
    from corept.lora.setup import expert_parameters

    # a mixture-of-experts model's stacked expert weights too (peft's target_parameters), as
    # corept.get_peft_model's default targets them
    extra = {}
    experts = expert_parameters(model, architecture_of(model.config))
    if experts:
        extra["target_parameters"] = experts
    if patched:
        pm = corept.get_peft_model(model, r=rank, lora_alpha=2 * rank, target_modules=targets,
                                   use_gradient_checkpointing="corept" if checkpointing else False, **extra)
    else:
        from peft import LoraConfig, get_peft_model

        quantized = getattr(model, "is_loaded_in_4bit", False)
        if quantized:
            for p in model.parameters():
                p.requires_grad_(False)
        pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                              lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **extra))
        if checkpointing:
            enable_reference_checkpointing(pm)
    randomize_lora(pm, seed)
    return pm


def enable_reference_checkpointing(model: nn.Module) -> None:
    """transformers' own gradient checkpointing (non-reentrant) on ``model`` (or its peft base)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def enable_patched_checkpointing(model: nn.Module) -> str:
    """corept's checkpointing (``"corept"``: offloaded on CUDA, ordinary recompute on CPU)."""
    return enable_checkpointing(model, "corept")


# -- 4-bit ----------------------------------------------------------------------------------------------
def save_folder(model: nn.Module, folder: Path) -> Path:
    """Write ``model`` as safetensors into ``folder`` (once)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder, safe_serialization=True)
    return folder


def load_4bit(folder: Path, compute_dtype: torch.dtype, class_name: str | None = None) -> nn.Module:
    """NF4 + double quantization through bitsandbytes, as ``corept.load(load_in_4bit=True)`` does.

    ``support_avx512bf16_for_cpu`` is switched off on every ``Linear4bit`` (corept.loading's
    ``disable_cpu_4bit_repack``): on AVX512-BF16 CPUs an eval forward would otherwise repack the
    weights into a layout without autograd and later gradients would silently vanish.
    """
    from transformers import AutoConfig, BitsAndBytesConfig

    config = AutoConfig.from_pretrained(folder)
    attn = forced_attention(config)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute_dtype)
    kwargs = {"attn_implementation": attn} if attn else {}
    model = model_class(class_name).from_pretrained(folder, dtype=compute_dtype, quantization_config=q,
                                                    **kwargs)
    n = disable_cpu_4bit_repack(model)
    if n == 0:
        raise AssertionError("the 4-bit model has no bitsandbytes Linear4bit layer")
    return model.eval()


def dequantized_fp32(base_fp32: nn.Module, quantized: nn.Module) -> nn.Module:
    """An fp32 copy of ``base_fp32`` holding exactly ``quantized``'s weights: 4-bit weights
    dequantized, every other parameter upcast. The fp32 *gold* of a bf16 4-bit model."""
    import bitsandbytes.functional as bnbf

    gold = copy.deepcopy(base_fp32)
    params = dict(gold.named_parameters())
    with torch.no_grad():
        for name, p in quantized.named_parameters():
            state = getattr(p, "quant_state", None)
            value = bnbf.dequantize_4bit(p.data, state) if state is not None else p.data
            params[name].copy_(value.to(torch.float32).reshape(params[name].shape))
    return gold


def to_fp32_gold(model_bf16: nn.Module) -> nn.Module:
    """An fp32 copy of a (non-quantized) bf16 model: the same rounded weights, fp32 compute."""
    return copy.deepcopy(model_bf16).to(torch.float32)
