"""transformers' hub kernelization, turned off for the instances corept patches.

With HF's ``kernels`` package installed, transformers (5.25+ by default) kernelizes models loaded
by ``from_pretrained``, and re-kernelizes them whenever ``train()``/``eval()`` changes the mode:
every module with a hub-kernel layer name (RMSNorm, ...) gets its instance ``forward`` replaced
or removed, which would silently remove corept's patches. corept patches those modules itself, so
for a patched instance it turns the mechanism off (the instance flags transformers reads, recorded
like any other change: ``corept.unpatch`` turns it back on). Forwards a kernelization already
installed on modules corept does not patch stay as they are.
"""
from __future__ import annotations

import logging

import torch.nn as nn

from corept.patching.state import Change

logger = logging.getLogger("corept")

SETTING = "hub_kernels"


def kernelized(model: nn.Module) -> bool:
    """transformers will re-kernelize ``model`` on ``train()``/``eval()``."""
    return bool(model.__dict__.get("_use_kernels", False))


def turn_off(model: nn.Module) -> Change | None:
    """Turn hub kernelization off on ``model`` (a transformers ``PreTrainedModel``), recorded."""
    if not kernelized(model):
        return None
    change = Change(model)
    change.set("_use_kernels", False)
    change.set("_kernels_mode", None)
    logger.info("corept: turned off transformers' hub kernelization on this %s: train()/eval() would replace "
                "corept's forwards; corept.unpatch turns it back on", type(model).__name__)
    return change
