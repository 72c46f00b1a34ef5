"""``corept.load``: read the config, pick the plugin, apply its policies, load, quantize, patch."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from corept.errors import InvalidOptionsError
from corept.loading.checkpoint import load_weights, read_config
from corept.loading.names import resolve_model_path
from corept.patching.engine import apply as apply_patches
from corept.registry.resolution import resolve
from corept.saving.fileset import JOURNAL, recover

logger = logging.getLogger("corept")

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


@dataclass(frozen=True)
class LoadOptions:
    """Validated options of one :func:`load` call (kept on the model as ``corept_load_options``)."""

    max_seq_length: int
    dtype: torch.dtype | None
    load_in_4bit: bool
    load_in_8bit: bool
    full_finetuning: bool
    trust_remote_code: bool


def validate_options(*, max_seq_length, dtype, load_in_4bit, load_in_8bit, full_finetuning,
                     trust_remote_code=False) -> LoadOptions:
    """Reject contradictory options before anything is resolved, downloaded or loaded."""
    if load_in_4bit and load_in_8bit:
        raise InvalidOptionsError("load_in_4bit and load_in_8bit are exclusive: choose one quantization.")
    if full_finetuning and (load_in_4bit or load_in_8bit):
        raise InvalidOptionsError("full_finetuning trains every weight and cannot train quantized weights: "
                                  "drop load_in_4bit/load_in_8bit, or keep them and train LoRA adapters "
                                  "(corept.get_peft_model).")
    if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length <= 0:
        raise InvalidOptionsError(f"max_seq_length must be a positive int, got {max_seq_length!r}.")
    if isinstance(dtype, str) and dtype != "auto":
        if dtype.lower() not in _DTYPES:
            raise InvalidOptionsError(f"dtype {dtype!r} is not understood; use one of {sorted(_DTYPES)}, "
                                      f"a torch dtype, 'auto' or None.")
        dtype = _DTYPES[dtype.lower()]
    elif dtype == "auto":
        dtype = None
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidOptionsError(f"dtype {dtype} is not supported for training; use bf16, fp16 or fp32.")
    if (load_in_4bit or load_in_8bit) and dtype == torch.float32:
        logger.info("corept: quantized weights with fp32 compute requested; LoRA matmuls run in fp32.")
    return LoadOptions(max_seq_length, dtype, bool(load_in_4bit), bool(load_in_8bit), bool(full_finetuning),
                       bool(trust_remote_code))


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def choose_dtype(requested: torch.dtype | None, force_float32: bool) -> tuple[torch.dtype, str]:
    """The dtype policy: auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU.

    Architectures declaring ``force_float32`` (fp16 overflows them) get fp32 instead of fp16.
    :returns: ``(dtype, why)``.
    """
    if requested is None:
        if not torch.cuda.is_available():
            return torch.float32, "auto: no CUDA device, so float32"
        if bf16_supported():
            return torch.bfloat16, "auto: bf16 supported"
        requested = torch.float16
        why = "auto: bf16 unsupported, so fp16"
    else:
        why = f"requested {requested}"
    if force_float32 and requested == torch.float16:
        return torch.float32, f"{why}; the architecture forces float32 instead of fp16 (fp16 overflows it)"
    if force_float32 and requested == torch.bfloat16 and torch.cuda.is_available() and not bf16_supported():
        return torch.float32, f"{why}; bf16 unsupported on this GPU and fp16 overflows it, so float32"
    return requested, why


def _quantization_config(opts: LoadOptions, dtype: torch.dtype, quant_storage: torch.dtype | None = None):
    if not (opts.load_in_4bit or opts.load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise InvalidOptionsError(f"load_in_4bit/load_in_8bit need bitsandbytes, which failed to import "
                                  f"({type(exc).__name__}: {exc}). pip install bitsandbytes.") from exc
    from transformers import BitsAndBytesConfig

    if opts.load_in_4bit:
        extra = {} if quant_storage is None else {"bnb_4bit_quant_storage": quant_storage}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, **extra)
    return BitsAndBytesConfig(load_in_8bit=True)


def _experts_on_cpu(config, arch, device, dtype, trust_remote_code: bool, qconfig) -> dict | None:
    """The device map of a 4-bit MoE load (:mod:`corept.loading.experts_onload`): experts on the CPU
    until each is quantized onto ``device``; ``None`` (load as usual) when no module is an experts one."""
    from transformers import AutoModelForCausalLM

    from corept.loading.experts_onload import experts_device_map

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    device_map = experts_device_map(meta, arch.roles.experts, device)
    if device_map is not None:
        qconfig.llm_int8_enable_fp32_cpu_offload = True  # lets transformers leave the (non-Linear) experts on the CPU
        logger.info("corept: 4-bit load of a mixture-of-experts model: experts stay on the CPU until each is "
                    "quantized onto the GPU")
    return device_map


def disable_cpu_4bit_repack(model: torch.nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference path.

    On CPUs with AVX512-BF16 an eval forward repacks ``Linear4bit`` weights into a layout whose
    matmul has no autograd, so later training silently gets no input gradients. Returns how many
    modules were changed.
    """
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


_GENERIC_FAST_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _declares_generic_fast_tokenizer(folder) -> bool:
    """The folder's tokenizer_config.json names the generic fast tokenizer and a tokenizer.json exists."""
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if not (os.path.isfile(cfg_path) and os.path.isfile(os.path.join(folder, "tokenizer.json"))):
        return False
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            declared = json.load(fh).get("tokenizer_class")
    except (OSError, ValueError):
        return False
    return declared in _GENERIC_FAST_TOKENIZERS


def load_tokenizer(folder, *, trust_remote_code: bool, max_seq_length: int):
    """The folder's tokenizer with ``model_max_length`` and a pad token set, or ``None`` if it has none."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = None
    if _declares_generic_fast_tokenizer(folder):
        # AutoTokenizer would substitute the model_type's own tokenizer class, which can re-tokenize
        # differently and add tokens; the folder asked for the generic one.
        tok = PreTrainedTokenizerFast.from_pretrained(folder)
    if tok is None:
        try:
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - fall back to the raw tokenizer.json below
            if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
                logger.warning("corept: no tokenizer in %s (%s); returning tokenizer=None.", folder, exc)
                return None
            tok = PreTrainedTokenizerFast.from_pretrained(folder)
    tok.model_max_length = max_seq_length
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
        logger.info("corept: tokenizer has no pad token; using eos %r for padding.", tok.eos_token)
    return tok


def load(name_or_path: str, *, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = False,
         load_in_8bit: bool = False, full_finetuning: bool = False, device_map=None, patch: bool = True,
         trust_remote_code: bool = False, token: str | None = None, revision: str | None = None,
         strict: bool = False, cache_dir: str | os.PathLike | None = None, bnb_4bit_quant_storage=None,
         compile=None):
    """Load a causal LM and its tokenizer, choose its plugin from the config, and patch it.

    :param name_or_path: local folder, HF cache / hub repo id, or a plugin-declared alias.
    :param max_seq_length: longest sequence you will train on (set on the tokenizer and model).
    :param dtype: ``None``/``"auto"`` (bf16 where supported, else fp16; fp32 on CPU), a torch
        dtype or a name (``"bf16"``, ``"fp16"``, ``"fp32"``). Float32 forcing quirks apply.
    :param load_in_4bit: NF4 with double quantization through bitsandbytes (QLoRA).
    :param load_in_8bit: LLM.int8 through bitsandbytes.
    :param full_finetuning: every weight will train (no quantization allowed).
    :param device_map: passed to transformers; default: this rank's GPU under ``torchrun`` /
        ``accelerate launch`` (``LOCAL_RANK``, which also becomes the current CUDA device), else
        the current GPU, else CPU.
    :param patch: apply the plugin's patches (``corept.patch``).
    :param trust_remote_code: off by default; remote modeling code is never run unless asked.
    :param strict: raise instead of warning when no plugin supports the architecture, or when
        the checkpoint lacks weights the model needs (or holds weights no module takes).
    :param bnb_4bit_quant_storage: dtype the packed 4-bit weights are stored in (default uint8);
        ``"auto"`` or a float dtype stores them in the compute dtype, which FSDP needs to shard
        4-bit weights like the other (floating) parameters (docs/distributed.md).
    :param compile: each decoder layer as one ``torch.compile`` region (docs/compile.md): ``None``
        (default) off unless ``COREPT_COMPILE=1``, ``False`` off (also ``COREPT_COMPILE=0``), ``True``
        on, or a dict of ``torch.compile`` arguments.
    :returns: ``(model, tokenizer)``; the tokenizer is ``None`` if the folder has none.
    """
    opts = validate_options(max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
                            load_in_8bit=load_in_8bit, full_finetuning=full_finetuning,
                            trust_remote_code=trust_remote_code)
    from transformers import AutoModelForCausalLM

    folder, how = resolve_model_path(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
    if (Path(folder) / JOURNAL).is_file():  # a corept.save into this folder was interrupted: finish it first
        recover(folder)
    config = read_config(Path(folder), trust_remote_code=trust_remote_code)
    arch = resolve(config, strict=strict)
    policy = arch.load if arch is not None else None
    torch_dtype, why = choose_dtype(opts.dtype, bool(policy and policy.force_float32))
    logger.info("corept: loading %s (%s), model_type %r, plugin %s, dtype %s (%s)", name_or_path, how,
                config.model_type, arch.plugin if arch else None, torch_dtype, why)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    if patch and arch is not None:
        # transformers (with HF `kernels` installed) would kernelize the modules corept patches and
        # re-kernelize them on every train()/eval(), replacing corept's forwards
        kwargs["use_kernels"] = False
    if policy is not None and policy.forced_attn_implementation:
        kwargs["attn_implementation"] = policy.forced_attn_implementation
        logger.info("corept: attention implementation %r (architecture quirk)", policy.forced_attn_implementation)
    storage = bnb_4bit_quant_storage
    if storage == "auto":
        storage = torch_dtype
    elif isinstance(storage, str):
        if storage.lower() not in _DTYPES:
            raise InvalidOptionsError(f"bnb_4bit_quant_storage {storage!r} is not understood; use 'auto' or one of "
                                      f"{sorted(_DTYPES)}.")
        storage = _DTYPES[storage.lower()]
    qconfig = _quantization_config(opts, torch_dtype, storage if opts.load_in_4bit else None)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    experts_offloaded = None
    if torch.cuda.is_available():
        from corept.distributed.launcher import use_local_device

        local = use_local_device()  # under torchrun / accelerate launch: GPU LOCAL_RANK becomes current
        if device_map is None and opts.load_in_4bit and patch and arch is not None and arch.roles.experts:
            device_map = _experts_on_cpu(config, arch, local, torch_dtype, trust_remote_code, qconfig)
            experts_offloaded = local if device_map is not None else None
        if device_map is None:
            device_map = {"": local}
    if device_map is not None:
        kwargs["device_map"] = device_map
    max_pos = getattr(config.get_text_config(), "max_position_embeddings", None)
    if max_pos is not None and max_seq_length > max_pos:
        logger.warning("corept: max_seq_length %d exceeds the model's max_position_embeddings %d; positions "
                       "beyond it are extrapolated by the model's own rope scaling (if any).", max_seq_length, max_pos)
    model = load_weights(AutoModelForCausalLM, Path(folder), config, kwargs, strict=strict)
    if experts_offloaded is not None:
        from corept.loading.experts_onload import onload_experts

        onload_experts(model, arch.roles.experts, experts_offloaded, quantize=True)
    if opts.load_in_4bit and not torch.cuda.is_available():
        disable_cpu_4bit_repack(model)
    model.max_seq_length = max_seq_length
    model.corept_load_options = opts
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code, max_seq_length=max_seq_length)
    if patch and arch is not None:
        apply_patches(model, arch, compile=compile)
        if opts.load_in_4bit:
            from corept.components.experts_4bit import quantize_patched_experts

            quantize_patched_experts(model)
    return model, tokenizer
