"""Every hook a corept plugin can implement (pluggy project name ``corept``).

Plugins implement these with :data:`corept.hookimpl`; they never import pluggy themselves.
The five component hooks are *firstresult*: the first non-``None`` answer wins, so a third-party
plugin marked ``tryfirst=True`` overrides a built-in for any architecture, and generic pure-torch
or kernel-backed fallbacks registered ``trylast`` answer only when nobody else did.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch.nn as nn

    from corept.architecture import Architecture, Quirks
    from corept.replacement import Replacement

PROJECT = "corept"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def corept_register_architectures() -> "list[Architecture]":
    """Declare the architectures this plugin supports.

    Called once per plugin when plugins load. Not firstresult: every plugin's list is collected,
    and a ``model_type`` claimed by two plugins with equal ``priority`` is a conflict.

    :return: the :class:`~corept.architecture.Architecture` objects this plugin owns.
    """


@hookspec(firstresult=True)
def corept_patch_attention(arch: "Architecture", quirks: "Quirks", module: "nn.Module",
                           model: "nn.Module") -> "Replacement | None":
    """Replace the forward of one attention module.

    Stops at the first non-None result.

    :param arch: the model's architecture declaration (its owning plugin is ``arch`` 's plugin).
    :param quirks: ``arch.quirks`` resolved against the model config (softcap, sliding window...).
    :param module: the attention module instance (a class listed in ``arch.roles.attention``).
    :param model: the whole model being patched.
    :return: a :class:`~corept.replacement.Replacement`, or ``None`` to leave it to others.
    """


@hookspec(firstresult=True)
def corept_patch_mlp(arch: "Architecture", quirks: "Quirks", module: "nn.Module",
                     model: "nn.Module") -> "Replacement | None":
    """Replace the forward of one gated MLP module.

    Stops at the first non-None result.

    :param arch: the model's architecture declaration.
    :param quirks: resolved quirks (``mlp_activation`` selects SwiGLU or GeGLU).
    :param module: the MLP module instance (a class listed in ``arch.roles.mlp``).
    :param model: the whole model being patched.
    :return: a :class:`~corept.replacement.Replacement`, or ``None``.
    """


@hookspec(firstresult=True)
def corept_patch_rope(arch: "Architecture", quirks: "Quirks", module: "nn.Module",
                      model: "nn.Module") -> "Replacement | None":
    """Replace how one attention module applies rotary position embeddings.

    Transformers' attention forwards look up ``apply_rotary_pos_emb`` as a module global; corept
    never rebinds it. A RoPE replacement instead targets the attention *instance*: it sets an
    instance attribute holding the rotary function (and, where needed, a forward that calls it).

    Stops at the first non-None result.

    :param arch: the model's architecture declaration.
    :param quirks: resolved quirks.
    :param module: the attention module instance whose rotary application is replaced.
    :param model: the whole model being patched.
    :return: a :class:`~corept.replacement.Replacement`, or ``None``.
    """


@hookspec(firstresult=True)
def corept_patch_norm(arch: "Architecture", quirks: "Quirks", module: "nn.Module",
                      model: "nn.Module") -> "Replacement | None":
    """Replace the forward of one normalization module (RMSNorm/LayerNorm, incl. q/k norms).

    Stops at the first non-None result.

    :param arch: the model's architecture declaration.
    :param quirks: resolved quirks (``norm_offset``, ``norm_casting``).
    :param module: the norm module instance (a class listed in ``arch.roles.norm``).
    :param model: the whole model being patched.
    :return: a :class:`~corept.replacement.Replacement`, or ``None``.
    """


@hookspec(firstresult=True)
def corept_patch_loss(arch: "Architecture", quirks: "Quirks", module: "nn.Module",
                      model: "nn.Module") -> "Replacement | None":
    """Replace the causal-LM head + loss forward (e.g. with a fused linear cross-entropy).

    Stops at the first non-None result.

    :param arch: the model's architecture declaration.
    :param quirks: resolved quirks (``final_logit_softcap``).
    :param module: the causal-LM module instance (a class listed in ``arch.roles.causal_lm``).
    :param model: the whole model being patched (often ``module`` itself).
    :return: a :class:`~corept.replacement.Replacement`, or ``None``.
    """


COMPONENT_HOOKS = {
    "attention": "corept_patch_attention",
    "mlp": "corept_patch_mlp",
    "rope": "corept_patch_rope",
    "norm": "corept_patch_norm",
    "loss": "corept_patch_loss",
}
# which ModuleRoles field each component's modules come from
COMPONENT_ROLES = {"attention": "attention", "mlp": "mlp", "rope": "attention", "norm": "norm",
                   "loss": "causal_lm"}
