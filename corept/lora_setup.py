"""``corept.get_peft_model``: LoRA/QLoRA through peft, with corept's fused LoRA kernels swapped in.

peft builds the adapters; corept then (1) prepares quantized models without upcasting the frozen
weights to fp32 (peft's ``prepare_model_for_kbit_training`` does, costing GBs on 8B models),
(2) turns on gradient checkpointing (``"corept"``: inputs offloaded to pinned CPU memory), and
(3) replaces, per instance, the forward of every gated MLP whose three projections take the fused
path with ``corept_kernels.lora_mlp``, of the q/k/v projections of every attention module whose
three take it (no bias, dropout 0, one adapter dtype) with one ``lora_qkv`` call (see
:class:`QKVGroup`), and of every other LoRA linear with ``lora_o`` (one linear, fewer saved
activations). Layers that cannot take the fast path (dropout, bias, DoRA...) keep peft's forward,
q/k/v that cannot be grouped run one projection at a time; the report says why.
"""
from __future__ import annotations

import copy
import logging
from typing import Iterable

import torch
import torch.nn as nn
from corept_kernels import lora_mlp, lora_o, lora_qkv
from corept_kernels.lora import lora_fast_path_reason, read_lora_weights

from corept.checkpointing import enable_checkpointing
from corept.components._device import implementation
from corept.errors import InvalidOptionsError
from corept.patching import apply_extra, report, state_holder
from corept.patching import patch as patch_model
from corept.patching import resolve_architecture
from corept.replacement import Replacement

logger = logging.getLogger("corept")
_PROJ = ("gate_proj", "up_proj", "down_proj")
_QKV = ("q_proj", "k_proj", "v_proj")


def _validate(r, lora_alpha, lora_dropout, bias, target_modules) -> None:
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


def prepare_quantized(model: nn.Module) -> None:
    """Freeze every weight of a k-bit model for adapter training, keeping their dtypes."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()


def _is_training_call(layer: nn.Module) -> bool:
    """Training mode, with or without gradients.

    Checkpointing's first pass runs the layers under ``no_grad``: on peft's path it would hold
    fp32 ``[N, out]`` adapter products (``N`` tokens; 56 KiB per token for an 8B MLP), which at long
    sequences is the step's peak. The fused path's outputs are peft's, so both passes take it; only
    eval mode (generation, evaluation) keeps peft's own forward.
    """
    return layer.training


def _adapter_dtype_reason(mods, names) -> str | None:
    """Why linears run as one fused call cannot share one adapter dtype, or ``None``."""
    dtypes = {n: {m.lora_A[a].weight.dtype for a in m.lora_A} | {m.lora_B[a].weight.dtype for a in m.lora_B}
              for n, m in zip(names, mods)}
    if len(set().union(*dtypes.values())) > 1:
        return "adapter dtypes differ: " + ", ".join(f"{n} {sorted(str(d) for d in ds)}" for n, ds in dtypes.items())
    return None


def _group_reason(mods, names) -> str | None:
    """Why ``mods`` (peft LoRA linears on one input) cannot run as one fused call, or ``None``."""
    for n, m in zip(names, mods):
        why = lora_fast_path_reason(m)
        if why is not None:
            return f"{n}: {why}"
    return _adapter_dtype_reason(mods, names)


def _fused_mlp_forward(activation: str, tile_rows: int | None = None):
    def forward(self, x, *args, **kwargs):
        projs = [getattr(self, p) for p in _PROJ]
        if not args and not kwargs and _is_training_call(self) and _group_reason(projs, _PROJ) is None:
            lws = [read_lora_weights(p) for p in projs]  # checked just above
            return lora_mlp(x, *lws, activation=activation, tile_rows=tile_rows)
        return self.corept_unfused_forward(x, *args, **kwargs)
    return forward


def _fused_linear_forward(self, x, *args, **kwargs):
    if not args and not kwargs and _is_training_call(self) and lora_fast_path_reason(self) is None:
        return lora_o(x, read_lora_weights(self))
    return self.corept_unfused_forward(x, *args, **kwargs)


class QKVGroup:
    """The q/k/v LoRA linears of one attention module, run as one ``lora_qkv`` call.

    transformers' attention forwards call ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` one after
    the other on the same ``h``. The first of the three called (in training, with gradients) runs
    all three projections in one fused call and keeps the other two outputs for the calls that
    follow with the same input (the same tensor object at the same version, and adapter weights
    at the same versions); each output is handed out once, and the kept ones are dropped as soon as
    both are taken, or replaced by the next call that does not match (an output nobody asks for,
    e.g. after a caller that runs only ``q_proj``, stays referenced, with its graph, until then:
    :meth:`clear` drops it). One fused node then gives ``h`` its gradient in peft's accumulation
    order (``corept_kernels.lora_autograd``), where three separate calls would add three
    pre-summed gradients in another order.

    :param mods: the peft LoRA linears ``(q_proj, k_proj, v_proj)``.
    """

    def __init__(self, mods):
        self.mods = tuple(mods)
        self._kept = None  # (x, x._version, weight versions, {index: output})

    def _versions(self) -> tuple:
        """Versions of the adapter weights (the trainable tensors of a fast-path linear, which has
        no bias): an optimizer step in between invalidates kept outputs. Read from the adapter
        dicts, not ``parameters()``, whose module walk is repeated for every attention call."""
        return tuple(lin.weight._version for m in self.mods for d in (m.lora_A, m.lora_B) for lin in d.values())

    def ready(self) -> bool:
        """All three in training mode, on the fast path, with one adapter dtype."""
        return all(_is_training_call(m) for m in self.mods) and _group_reason(self.mods, _QKV) is None

    def output(self, module, x: torch.Tensor) -> torch.Tensor | None:
        """``module``'s projection of ``x`` (``[..., H]`` -> ``[..., out]``), from a kept output or a
        fresh fused call of all three; ``None`` when the three cannot run fused now (:meth:`ready`)."""
        idx = next(i for i, m in enumerate(self.mods) if m is module)
        versions = self._versions()
        kept = self._kept
        if kept is not None and kept[0] is x and kept[1] == x._version and kept[2] == versions and idx in kept[3]:
            out = kept[3].pop(idx)
            if not kept[3]:
                self._kept = None
            return out
        if not self.ready():
            return None
        outs = lora_qkv(x, *(read_lora_weights(m) for m in self.mods))  # ready() checked them
        self._kept = (x, x._version, versions, {i: o for i, o in enumerate(outs) if i != idx})
        return outs[idx]

    def clear(self) -> None:
        """Drop the kept outputs (and the autograd graph they hold)."""
        self._kept = None

    def __deepcopy__(self, memo):
        new = QKVGroup.__new__(QKVGroup)
        memo[id(self)] = new
        new.mods, new._kept = copy.deepcopy(self.mods, memo), None
        return new

    def __getstate__(self):
        return {"mods": self.mods, "_kept": None}


def _fused_qkv_forward(self, x, *args, **kwargs):
    if not args and not kwargs and _is_training_call(self):
        out = self.corept_qkv_group.output(self, x)
        if out is not None:
            return out
    return self.corept_unfused_forward(x, *args, **kwargs)


def _fallback_text(reasons: dict, groups: dict) -> str | None:
    parts = []
    if reasons:
        name, why = next(iter(reasons.items()))
        parts.append(f"{len(reasons)} LoRA layer(s) keep peft's path, e.g. {name}: {why}")
    if groups:
        name, why = next(iter(groups.items()))
        parts.append(f"{len(groups)} MLP/attention module(s) not fused as one call, e.g. {name}: {why}")
    return "; ".join(parts) or None


def install_fused_lora(model: nn.Module, activation: str, mlp_classes: Iterable[str],
                       attention_classes: Iterable[str] = (), mlp_tile_rows: int | None = None) -> tuple[dict, dict, dict]:
    """Swap fused LoRA forwards into the MLPs, attention q/k/v and LoRA linears of a patched peft model.

    :param mlp_classes: class names of the gated MLPs (``gate_proj``/``up_proj``/``down_proj``).
    :param attention_classes: class names of the attention modules whose ``q_proj``/``k_proj``/
        ``v_proj`` take one input (transformers' self-attention): grouped into one ``lora_qkv``.
    :param mlp_tile_rows: the fused MLPs' sequence tiling (``corept_kernels.lora_mlp``'s
        ``tile_rows``): ``None`` automatic, ``0`` never, ``k`` tiles of ``k`` tokens.
    :returns: ``(counts, {module name: reason it kept peft's path}, {MLP/attention module name:
        reason its projections run one at a time})``; counts are ``{"lora_mlp": MLPs, "lora_qkv":
        attention modules, "lora_o": single linears}``.
    """
    mlp_classes, attention_classes = set(mlp_classes), set(attention_classes)
    pairs, reasons, groups, grouped = [], {}, {}, set()
    counts = {"lora_mlp": 0, "lora_qkv": 0, "lora_o": 0}
    impl = {k: implementation(k, model)[0] for k in counts}
    for name, m in model.named_modules():
        cls = type(m).__name__
        if cls in mlp_classes and all(hasattr(getattr(m, p, None), "lora_A") for p in _PROJ):
            why = _group_reason([getattr(m, p) for p in _PROJ], _PROJ)
            if why is not None:
                groups[name] = why
                continue
            pairs.append((m, Replacement(impl["lora_mlp"], forward=_fused_mlp_forward(activation, mlp_tile_rows),
                                         attributes={"corept_unfused_forward": m.forward})))
            grouped.update(id(getattr(m, p)) for p in _PROJ)
            counts["lora_mlp"] += 1
        elif cls in attention_classes and all(hasattr(getattr(m, p, None), "lora_A") for p in _QKV):
            mods = [getattr(m, p) for p in _QKV]
            why = _group_reason(mods, _QKV)
            if why is not None:
                groups[name] = why
                continue
            group = QKVGroup(mods)
            for lin in mods:
                pairs.append((lin, Replacement(impl["lora_qkv"], forward=_fused_qkv_forward,
                                               attributes={"corept_unfused_forward": lin.forward,
                                                           "corept_qkv_group": group})))
                grouped.add(id(lin))
            counts["lora_qkv"] += 1
    for name, m in model.named_modules():
        if not hasattr(m, "lora_A") or id(m) in grouped:
            continue
        why = lora_fast_path_reason(m)
        if why is not None:
            reasons[name] = why
            continue
        pairs.append((m, Replacement(impl["lora_o"], forward=_fused_linear_forward,
                                     attributes={"corept_unfused_forward": m.forward})))
        counts["lora_o"] += 1
    apply_extra(model, "lora", pairs, _fallback_text(reasons, groups))
    # one entry per fused call site (apply_extra counts replaced modules: three per q/k/v group)
    applied = ", ".join(f"{impl[k]} x{n}" for k, n in counts.items() if n)
    if applied:
        report(model).applied["lora"] = applied
    return counts, reasons, groups


def get_peft_model(model: nn.Module, r: int = 16, lora_alpha: float = 16, lora_dropout: float = 0.0,
                   target_modules="all-linear", bias: str = "none", use_gradient_checkpointing="corept",
                   use_rslora: bool = False, loftq_config=None, modules_to_save=None, random_state: int = 3407,
                   mlp_tile_rows: int | None = None, **lora_kwargs):
    """Add LoRA adapters to a (corept-loaded) model and return the ``PeftModel``.

    :param r: adapter rank. :param lora_alpha: scaling numerator (scaling = alpha / r, or
        alpha / sqrt(r) with ``use_rslora``). :param lora_dropout: 0 keeps the fused fast path.
    :param target_modules: ``"all-linear"`` (the architecture's declared LoRA targets, else peft's
        all-linear) or a list of module names.
    :param use_gradient_checkpointing: ``"corept"`` (offloaded), ``True`` (standard) or ``False``.
    :param random_state: seed for the adapter initialisation.
    :param mlp_tile_rows: sequence tiling of the fused LoRA MLPs, for long contexts. ``None``
        (default): automatic, on only for calls whose gate/up projections would exceed 2 GiB
        (Llama-3.1-8B: ~37k tokens per batch); ``0``: never; ``k``: tiles of ``k`` tokens whenever
        a call has more. Tiled, an MLP keeps no ``[tokens, intermediate]`` tensor for backward and
        recomputes each tile's forward there (one more MLP forward per step).
    """
    from peft import LoraConfig
    from peft import get_peft_model as peft_get_peft_model

    _validate(r, lora_alpha, lora_dropout, bias, target_modules)
    if mlp_tile_rows is not None and (not isinstance(mlp_tile_rows, int) or isinstance(mlp_tile_rows, bool)
                                      or mlp_tile_rows < 0):
        raise InvalidOptionsError(f"mlp_tile_rows must be None (automatic), 0 (never) or a positive token count, "
                                  f"got {mlp_tile_rows!r}")
    opts = getattr(model, "corept_load_options", None)
    if opts is not None and opts.full_finetuning:
        raise InvalidOptionsError("this model was loaded with full_finetuning=True: train it directly, or reload "
                                  "without full_finetuning to add LoRA adapters.")
    if hasattr(model, "peft_config"):
        raise InvalidOptionsError("model already has peft adapters; call get_peft_model on the base model once.")
    found = resolve_architecture(model.config.model_type, strict=False)
    targets = target_modules
    if target_modules == "all-linear" and found is not None and found[0].lora_targets:
        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or hasattr(m, "quant_state") or type(m).__name__.startswith("Linear")}
        targets = [t for t in found[0].lora_targets if t in present] or "all-linear"
    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    if quantized:
        prepare_quantized(model)
    torch.manual_seed(random_state)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, bias=bias,
                        use_rslora=use_rslora, loftq_config=loftq_config or {}, modules_to_save=modules_to_save,
                        task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = peft_get_peft_model(model, config)
    ck = enable_checkpointing(peft_model, use_gradient_checkpointing)
    if state_holder(peft_model) is None and found is not None:
        patch_model(peft_model)
    if state_holder(peft_model) is not None and found is not None:
        arch = found[0]
        quirks = arch.quirks.resolve(model.config.get_text_config())
        counts, reasons, groups = install_fused_lora(peft_model, quirks.mlp_activation, arch.roles.mlp,
                                                     arch.roles.attention, mlp_tile_rows)
        logger.info("corept: fused LoRA on %d MLP(s), %d q/k/v group(s) and %d linear(s); %d layer(s) on "
                    "peft's path, %d module(s) not grouped", counts["lora_mlp"], counts["lora_qkv"],
                    counts["lora_o"], len(reasons), len(groups))
        rep = report(peft_model)
        rep.applied["checkpointing"] = ck
    return peft_model
