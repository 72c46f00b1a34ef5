"""``corept.get_peft_model``: LoRA/QLoRA through peft, with corept's fused LoRA kernels swapped in.

peft builds the adapters; corept then (1) prepares quantized models without upcasting the frozen
weights to fp32 (peft's ``prepare_model_for_kbit_training`` does, costing GBs on 8B models),
(2) turns on gradient checkpointing (``"corept"``: inputs offloaded to pinned CPU memory), and
(3) asks the ``corept_patch_lora`` hook, per attention and MLP module and then per remaining LoRA
linear, how to run the adapters (the built-in answers are in :mod:`corept.components.lora`); the
answers are recorded in the model's patch state like every other patch.

**Targets.** ``target_modules="all-linear"`` (the default) means the architecture's declared
``lora_targets`` when it declares them (a declared name the model lacks is warned about), else
every linear layer inside the model's attention and MLP modules (named by the architecture's
roles): what the model actually has, fused ``qkv_proj``/``gate_up_proj`` included. A model no
plugin claims gets peft's own ``"all-linear"``. A mixture-of-experts model's stacked expert weights
are parameters, not linears: with ``"all-linear"`` they are targeted too, through peft's
``target_parameters`` (:func:`expert_parameters`; pass ``target_parameters=[]`` to leave the experts
frozen, or your own list), and run on corept's grouped GEMMs (:mod:`corept.components.experts`).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from corept.errors import InvalidOptionsError
from corept.patching.engine import architecture_of, ask, base_of, patch, record, state_of
from corept.training.checkpointing import enable_checkpointing

logger = logging.getLogger("corept")


def _validate(r, lora_alpha, lora_dropout, bias, target_modules, mlp_tile_rows) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidOptionsError(f"r must be a positive int, got {r!r}")
    if not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise InvalidOptionsError(f"lora_alpha must be positive, got {lora_alpha!r}")
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise InvalidOptionsError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if bias not in ("none", "all", "lora_only"):
        raise InvalidOptionsError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    if not (target_modules == "all-linear" or (isinstance(target_modules, (list, tuple)) and target_modules
                                                and all(isinstance(t, str) for t in target_modules))):
        raise InvalidOptionsError(f"target_modules must be 'all-linear' or a non-empty list of module names, "
                                  f"got {target_modules!r}")
    if mlp_tile_rows is not None and (not isinstance(mlp_tile_rows, int) or isinstance(mlp_tile_rows, bool)
                                      or mlp_tile_rows < 0):
        raise InvalidOptionsError(f"mlp_tile_rows must be None (automatic), 0 (never) or a positive token count, "
                                  f"got {mlp_tile_rows!r}")


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a bitsandbytes/other quantized linear (``Linear4bit``, ``Linear8bitLt``...)."""
    return isinstance(module, nn.Linear) or type(module).__name__.startswith("Linear")


def default_targets(model: nn.Module, arch) -> list[str] | str:
    """The LoRA target names for ``target_modules="all-linear"`` (see the module docstring)."""
    if arch is None:
        return "all-linear"
    roles = set(arch.roles.attention) | set(arch.roles.mlp)
    inside = sorted({name for m in model.modules() if type(m).__name__ in roles
                     for name, child in m.named_children() if is_linear(child)})
    if arch.lora_targets is None:
        if not inside:
            logger.warning("corept: no linear layer inside %s modules; LoRA targets peft's all-linear",
                           sorted(roles))
            return "all-linear"
        return inside
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)}
    absent = [t for t in arch.lora_targets if t not in present]
    if absent:
        logger.warning("corept: declared LoRA target(s) %s are not linear layers of this %s model; targeting %s",
                       absent, arch.model_type, [t for t in arch.lora_targets if t in present])
    return [t for t in arch.lora_targets if t in present] or "all-linear"


def expert_parameters(model: nn.Module, arch) -> list[str]:
    """peft ``target_parameters`` for the experts modules' stacked weights: ``"<attribute>.<weight>"``
    (e.g. ``experts.gate_up_proj``, matched by suffix), for every 3-D weight of a class in
    ``arch.roles.experts`` (NF4 ones by their unquantized shape)."""
    from corept.components.experts_4bit import logical_shape

    if arch is None or not arch.roles.experts:
        return []
    classes = set(arch.roles.experts)
    found = {f"{name.rsplit('.', 1)[-1]}.{p}" for name, m in model.named_modules() if type(m).__name__ in classes
             for p, w in m.named_parameters(recurse=False) if len(logical_shape(w)) == 3}
    return sorted(found)


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every name in ``targets`` matches a module (peft's rule: the name or its dotted suffix).

    :raises InvalidOptionsError: listing the names that match nothing and the linear layers there are.
    """
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
        raise InvalidOptionsError(f"target_modules {missing} match no module of this model; its linear layers "
                                  f"are {linears} (or use 'all-linear')")


def prepare_quantized(model: nn.Module) -> None:
    """Freeze every weight of a k-bit model for adapter training, keeping their dtypes."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()


def install_fused_lora(peft_model: nn.Module) -> None:
    """Ask ``corept_patch_lora`` about every attention and MLP module, then every other LoRA linear."""
    arch = architecture_of(peft_model)
    roles = set(arch.roles.attention) | set(arch.roles.mlp)
    base = base_of(peft_model)
    answers, covered = [], set()
    for m in base.modules():
        if type(m).__name__ in roles and any(hasattr(c, "lora_A") for c in m.modules()):
            answers.append((m, ask("corept_patch_lora", arch, m, peft_model)))
            covered.update(id(c) for c in m.children())
    # a peft ParamWrapper nests one wrapper per targeted parameter: only the outermost is asked
    covered.update(id(m.base_layer) for m in base.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    for m in base.modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer") and id(m) not in covered:
            answers.append((m, ask("corept_patch_lora", arch, m, peft_model)))
    record(peft_model, "lora", answers)


def get_peft_model(model: nn.Module, r: int = 16, lora_alpha: float = 16, lora_dropout: float = 0.0,
                   target_modules="all-linear", bias: str = "none", use_gradient_checkpointing="auto",
                   use_rslora: bool = False, loftq_config=None, modules_to_save=None, random_state: int = 3407,
                   mlp_tile_rows: int | None = None, memory_budget_gib: float | None = None, **lora_kwargs):
    """Add LoRA adapters to a (corept-loaded) model and return the ``PeftModel``.

    :param r: adapter rank. :param lora_alpha: scaling numerator (scaling = alpha / r, or
        alpha / sqrt(r) with ``use_rslora``). :param lora_dropout: 0 keeps the fused fast path.
    :param target_modules: ``"all-linear"`` (see the module docstring) or a list of module names.
    :param use_gradient_checkpointing: ``"auto"`` (default: per batch shape, keep the activations
        when the planner says the step fits the GPU, else ``"corept"``), ``"corept"`` (offloaded
        recompute: the least memory), ``True`` (standard) or ``False``.
    :param memory_budget_gib: GPU memory ``"auto"`` may plan for (default: the GPU's total).
    :param random_state: seed for the adapter initialisation.
    :param mlp_tile_rows: sequence tiling of the fused LoRA MLPs, for long contexts. ``None``
        (default): automatic, on only for calls whose gate/up projections would exceed 2 GiB
        (Llama-3.1-8B: ~37k tokens per batch); ``0``: never; ``k``: tiles of ``k`` tokens whenever
        a call has more. Tiled, an MLP keeps no ``[tokens, intermediate]`` tensor for backward and
        recomputes each tile's forward there (one more MLP forward per step).
    """
    from peft import LoraConfig
    from peft import get_peft_model as peft_get_peft_model

    _validate(r, lora_alpha, lora_dropout, bias, target_modules, mlp_tile_rows)
    opts = getattr(model, "corept_load_options", None)
    if opts is not None and opts.full_finetuning:
        raise InvalidOptionsError("this model was loaded with full_finetuning=True: train it directly, or reload "
                                  "without full_finetuning to add LoRA adapters.")
    if hasattr(model, "peft_config"):
        raise InvalidOptionsError("model already has peft adapters; call get_peft_model on the base model once.")
    if state_of(model) is None:
        patch(model)
    arch = architecture_of(model)
    targets = default_targets(model, arch) if target_modules == "all-linear" else list(target_modules)
    if targets != "all-linear":
        check_targets(model, targets)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        prepare_quantized(model)
    if target_modules == "all-linear" and "target_parameters" not in lora_kwargs:
        experts = expert_parameters(model, arch)
        if experts:
            lora_kwargs["target_parameters"] = experts
    torch.manual_seed(random_state)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, bias=bias,
                        use_rslora=use_rslora, loftq_config=loftq_config or {}, modules_to_save=modules_to_save,
                        task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = peft_get_peft_model(model, config)
    enable_checkpointing(peft_model, use_gradient_checkpointing, memory_budget_gib)
    if arch is not None and arch.supported:
        state_of(peft_model).options["mlp_tile_rows"] = mlp_tile_rows
        install_fused_lora(peft_model)
    return peft_model
