"""The CUDA caching-allocator setting ``corept train`` runs with.

Long sequences make a few very large, differently sized activation blocks per step. The default
allocator carves them out of fixed segments and, under a tight memory cap, can fail with gigabytes
reserved but free in split segments (seen on the H200 at ~56k tokens under a 24 GiB cap). With
``expandable_segments`` the allocator maps more memory into one segment instead, which keeps
reserved close to allocated. The VRAM planner (:mod:`corept.planning`) assumes this setting.

Only ``corept train`` (a process corept owns) asks for it, and only when the user has not set an
allocator configuration; library calls (``corept.load``) leave the process's allocator alone.
"""
from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("corept")

EXPANDABLE = "expandable_segments:True"
_USER_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def prefer_expandable_segments() -> str | None:
    """Use expandable segments unless the user configured the allocator; returns what was set.

    Must run before the first CUDA allocation to take effect through the environment; if CUDA is
    already initialized the setting is applied to the live allocator instead.
    """
    if any(os.environ.get(v) for v in _USER_VARS):
        return None
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            torch.cuda.memory._set_allocator_settings(EXPANDABLE)
        except (AttributeError, RuntimeError) as exc:  # older torch: the environment alone, next process
            logger.info("corept: could not switch the live CUDA allocator to %s (%s)", EXPANDABLE, exc)
            return None
    logger.info("corept: CUDA allocator %s (set PYTORCH_CUDA_ALLOC_CONF to choose another)", EXPANDABLE)
    return EXPANDABLE
