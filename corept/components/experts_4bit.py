"""NF4 stacked experts: QLoRA for mixture-of-experts layers.

bitsandbytes quantizes ``nn.Linear`` modules only, so a 4-bit load keeps transformers' stacked
experts (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``: most of a MoE model's weights) in
16 bits. Here each stacked weight becomes a bitsandbytes ``Params4bit`` (NF4, double quantization,
blocks of 64, bitsandbytes' own ``quantize_4bit``), still a parameter of the experts module under
its own name:

* it carries ``ds_shape``, the logical ``[E, out, in]`` shape, which peft reads for a parameter
  stored in another shape (``LoraConfig(target_parameters=...)`` sizes the per-expert LoRA factors
  from it);
* corept's experts forward (:mod:`corept.components.experts`) hands it to
  ``corept_kernels.expert_linear`` with :func:`dequantize`: the kernel keeps the 4-bit weight for
  the backward and dequantizes it again there, so the 16-bit experts of one layer exist only while
  that layer computes;
* merged saving dequantizes it like any 4-bit weight (:mod:`corept.saving.merge`).

Only experts whose forward corept replaced are quantized (transformers' own forward cannot read a
packed weight); :func:`restore_dense` turns them back into 16-bit parameters when the model is
unpatched. Quantizing goes module by module, so the 16-bit copy of one experts module at a time is
what it adds to the loaded model's memory.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

logger = logging.getLogger("corept")

WEIGHTS = ("gate_up_proj", "down_proj")
BLOCKSIZE = 64


def is_4bit(t) -> bool:
    """A bitsandbytes 4-bit parameter (packed data with its quant state)."""
    return getattr(t, "quant_state", None) is not None


def logical_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The unquantized shape of a stacked weight (a 4-bit one's is in its quant state)."""
    return tuple(t.quant_state.shape) if is_4bit(t) else tuple(t.shape)


def compute_dtype(experts: nn.Module) -> torch.dtype | None:
    """The dtype a 4-bit experts module computes in (its weights' original dtype), or ``None``."""
    w = getattr(experts, WEIGHTS[0], None)
    return w.quant_state.dtype if is_4bit(w) else None


def dequantize(w: torch.Tensor) -> torch.Tensor:
    """The dense stacked weight (``[E, out, in]`` or the transposed layout, compute dtype) of a
    4-bit parameter: a fresh buffer."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(w.data, w.quant_state)


def dense(experts: nn.Module, name: str) -> torch.Tensor:
    """``experts.<name>`` as a dense tensor: the parameter itself, or a fresh dequantized copy."""
    w = getattr(experts, name)
    return dequantize(w) if is_4bit(w) else w


def quantize_weight(w: torch.Tensor) -> nn.Parameter:
    """A frozen NF4 ``Params4bit`` of the stacked weight ``w`` (on ``w``'s device)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    data = w.detach().contiguous()
    packed, state = bnbf.quantize_4bit(data, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    p = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                          compress_statistics=True, quant_type="nf4", bnb_quantized=True, module=None)
    p.ds_shape = torch.Size(data.shape)  # peft sizes LoRA on a parameter from it (see module notes)
    return p


def quantize_experts(modules: list[nn.Module]) -> int:
    """Quantize the stacked weights of ``modules`` (experts modules whose forward corept replaced)
    to NF4 in place; returns how many weights were quantized."""
    done = 0
    for m in modules:
        for name in WEIGHTS:
            w = m._parameters.get(name)
            if w is None or is_4bit(w) or not w.is_floating_point():
                continue
            m._parameters[name] = quantize_weight(w)
            del w
            done += 1
    return done


def restore_dense(modules: list[nn.Module]) -> int:
    """Dequantize the 4-bit stacked weights of ``modules`` back into frozen 16-bit parameters."""
    done = 0
    for m in modules:
        for name in WEIGHTS:
            w = m._parameters.get(name)
            if w is not None and is_4bit(w):
                m._parameters[name] = nn.Parameter(dequantize(w), requires_grad=False)
                done += 1
    return done


@contextlib.contextmanager
def dense_during(experts: nn.Module):
    """Inside: ``experts``' 4-bit weights are their dequantized 16-bit parameters (for a probe run
    of transformers' or peft's forward); the 4-bit ones and the parameter order come back after."""
    order = list(experts._parameters.items())
    swapped = {n: p for n, p in order if n in WEIGHTS and is_4bit(p)}
    for n, p in swapped.items():
        experts._parameters[n] = nn.Parameter(dequantize(p), requires_grad=False)
    try:
        yield
    finally:
        if swapped:
            experts._parameters.clear()
            experts._parameters.update(order)


SETTING = "experts_4bit"


def quantize_patched_experts(model: nn.Module) -> int:
    """After ``corept.load(..., load_in_4bit=True)`` patched ``model``: quantize the experts whose
    forward corept replaced, record it in the report (``settings["experts_4bit"]``), and log the
    experts kept in 16 bits with their reason. Returns how many weights were quantized."""
    from corept.patching.engine import state_of

    state = state_of(model)
    if state is None:
        return 0
    modules = [c.module for c in state.changes if any(p[0] == "experts" for p in c.parts)]
    served = {id(m) for m in modules}
    # quantized while loading (corept.loading.experts_onload) but kept by the patch: back to 16 bits
    restore_dense([m for m in model.modules() if id(m) not in served
                   and any(is_4bit(m._parameters.get(n)) for n in WEIGHTS)])
    quantize_experts(modules)  # those not quantized while loading
    done = sum(is_4bit(m._parameters.get(n)) for m in modules for n in WEIGHTS)
    if done:
        state.settings[SETTING] = f"{done} stacked expert weights in NF4 ({len(modules)} experts modules)"
        state.options[SETTING] = modules
        logger.info("corept: %d stacked expert weights quantized to NF4 (bitsandbytes quantizes nn.Linear only)", done)
    kept = state.kept.get("experts")
    if kept:
        logger.warning("corept: %d experts modules keep 16-bit weights under load_in_4bit: transformers' forward "
                       "serves them (%s)", len(kept), kept[0])
    return done


def unpatched(state) -> None:
    """``corept.unpatch``: transformers' experts forward reads 16-bit weights; dequantize them back."""
    modules = state.options.pop(SETTING, None)
    if modules:
        n = restore_dense(modules)
        logger.info("corept.unpatch: %d NF4 expert weights dequantized back to 16 bits for transformers' forward", n)
