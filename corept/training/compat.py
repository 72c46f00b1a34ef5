"""How corept's patches and TRL's trainers share one model.

* **TRL's fused LM head.** ``SFTTrainer``, ``DPOTrainer`` and ``KTOTrainer`` call
  ``trl.trainer.utils.add_fused_lm_head`` on the (base) model: it sets an instance ``forward``
  that wraps the current one. On a corept model the wrapped forward is corept's causal-LM forward,
  so the two compose: ``model(..., fused_lm_head=True)`` runs the corept-patched backbone and TRL's
  chunked log-prob head; any other call (generation, eval, plain HF ``Trainer``) runs corept's
  forward (fused linear cross-entropy in training). ``corept.unpatch`` on such a model cannot
  remove corept's forward (TRL's wrapper holds it) and leaves the wrapper with a warning;
  :func:`trl_head_scope` instead puts the pre-TRL ``forward`` back once training is over, so
  ``corept.unpatch`` is exact again.
* **bitsandbytes CPU repack.** An eval forward under ``no_grad`` on an AVX512-BF16 CPU repacks
  ``Linear4bit`` weights into a layout whose matmul has no autograd (silently no input
  gradients). ``corept.load`` turns that off; :func:`guard_4bit` re-applies it to every 4-bit
  module (peft or TRL may have created new ones) and checks none was repacked already.
* **Gradient checkpointing.** corept installs its own checkpoint function on each layer; TRL's
  config must say ``gradient_checkpointing=False`` or the HF Trainer would re-enable transformers'
  own and replace it. DPO/KTO still switch checkpointing off and on around the reference pass;
  :mod:`corept.checkpointing` re-installs corept's function after every enable on that instance.
  :func:`checkpointing_functions` lets tests check it survived.
"""
from __future__ import annotations

import contextlib
import logging

import torch.nn as nn

logger = logging.getLogger("corept")
_MISSING = object()


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (TRL patches that one), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_trl_head(model: nn.Module) -> bool:
    """Whether TRL's fused LM head wraps ``model``'s forward (its function takes ``fused_lm_head``).

    The wrapper copies the model class's signature (``functools.wraps``), so its code is read.
    """
    fwd = base_model(model).__dict__.get("forward")
    code = getattr(getattr(fwd, "__func__", fwd), "__code__", None)
    if code is None:
        return False
    return "fused_lm_head" in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


@contextlib.contextmanager
def trl_head_scope(*models: nn.Module):
    """Restore each model's instance ``forward`` (as it was on entry) on exit.

    Wrap the life of a TRL trainer in it: inside, TRL's fused head composes with corept's
    forward; after it, ``corept.unpatch`` finds exactly what corept set and undoes it silently.
    """
    saved = [(base_model(m), base_model(m).__dict__.get("forward", _MISSING)) for m in models if m is not None]
    try:
        yield
    finally:
        for m, fwd in saved:
            if fwd is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = fwd


def guard_4bit(model: nn.Module | None) -> int:
    """Keep bitsandbytes from repacking 4-bit weights on CPU; returns the number of 4-bit modules.

    :raises RuntimeError: a weight was already repacked (training would get no input gradients).
    """
    if model is None:
        return 0
    from corept.loading import disable_cpu_4bit_repack

    n = disable_cpu_4bit_repack(model)
    for name, m in model.named_modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(f"4-bit weight of {name} was repacked for bitsandbytes' CPU inference kernel by an "
                               f"eval forward before training; reload the model with corept.load (it disables "
                               f"the repack) and train again")
    return n


def checkpointing_functions(model: nn.Module) -> set:
    """The distinct ``_gradient_checkpointing_func`` objects on checkpointable layers of ``model``."""
    return {m._gradient_checkpointing_func for m in base_model(model).modules()
            if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")}
