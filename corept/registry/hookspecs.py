"""Every hook a corept plugin can implement (pluggy project name ``corept``).

Plugins implement these with :data:`corept.hookimpl`; they never import pluggy themselves.
The component hooks are *firstresult*: the first answer that is not ``None`` wins. A hook answers

* a :class:`~corept.patching.answers.Replacement`: patch this module instance;
* a :class:`~corept.patching.answers.Keep`: keep transformers' implementation here, for the
  reason given (the search stops; the report shows the reason);
* ``None``: no opinion; the next implementation is asked.

Built-in implementations (the shared kernel-backed components, plugin ``corept.components``)
answer last (``trylast``) for every declared architecture; a plugin's own implementation, or a
third party's ``tryfirst`` one, is asked before them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch.nn as nn

    from corept.patching.answers import Keep, Replacement
    from corept.registry.declarations import Architecture
    from corept.registry.resolution import ResolvedArchitecture

PROJECT = "corept"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def corept_register_architectures() -> "list[Architecture]":
    """Declare the architectures this plugin supports.

    Called once per plugin when plugins load. Not firstresult: every plugin's list is collected,
    and a ``model_type`` claimed by two plugins with equal ``priority`` is a conflict.

    :return: the :class:`~corept.registry.declarations.Architecture` objects this plugin owns.
    """


@hookspec(firstresult=True)
def corept_patch_attention(arch: "ResolvedArchitecture", module: "nn.Module",
                           model: "nn.Module") -> "Replacement | Keep | None":
    """Replace the forward of one attention module.

    Stops at the first non-None result.

    :param arch: the model's architecture, resolved against its config (``arch.declaration`` is
        the plugin's :class:`~corept.registry.declarations.Architecture`; ``arch.numerics``,
        ``arch.recorded`` hold resolved values).
    :param module: the attention module instance (a class listed in ``arch.roles.attention``).
    :param model: the whole model being patched.
    :return: a ``Replacement``, a ``Keep`` with its reason, or ``None`` to leave it to others.
    """


@hookspec(firstresult=True)
def corept_patch_mlp(arch: "ResolvedArchitecture", module: "nn.Module",
                     model: "nn.Module") -> "Replacement | Keep | None":
    """Replace the forward of one gated MLP module.

    Stops at the first non-None result.

    :param arch: the resolved architecture (``arch.numerics.mlp_activation``, ``arch.projections``).
    :param module: the MLP module instance (a class listed in ``arch.roles.mlp``).
    :param model: the whole model being patched.
    :return: a ``Replacement``, a ``Keep``, or ``None``.
    """


@hookspec(firstresult=True)
def corept_patch_rope(arch: "ResolvedArchitecture", module: "nn.Module",
                      model: "nn.Module") -> "Replacement | Keep | None":
    """Replace how one attention module applies rotary position embeddings.

    Transformers' attention forwards look up ``apply_rotary_pos_emb`` as a module global; corept
    never rebinds it. A RoPE replacement instead targets the attention *instance* (e.g. through
    ``Replacement.forward_globals``, which rebinds the name for this instance's forward only).

    Stops at the first non-None result.

    :param arch: the resolved architecture.
    :param module: the attention module instance whose rotary application is replaced.
    :param model: the whole model being patched.
    :return: a ``Replacement``, a ``Keep``, or ``None``.
    """


@hookspec(firstresult=True)
def corept_patch_norm(arch: "ResolvedArchitecture", module: "nn.Module",
                      model: "nn.Module") -> "Replacement | Keep | None":
    """Replace the forward of one normalization module (RMSNorm, incl. q/k norms of that class).

    Stops at the first non-None result.

    :param arch: the resolved architecture (``arch.numerics.norm_offset``, ``norm_casting``).
    :param module: the norm module instance (a class listed in ``arch.roles.norm``).
    :param model: the whole model being patched.
    :return: a ``Replacement``, a ``Keep``, or ``None``.
    """


@hookspec(firstresult=True)
def corept_patch_loss(arch: "ResolvedArchitecture", module: "nn.Module",
                      model: "nn.Module") -> "Replacement | Keep | None":
    """Replace the causal-LM head + loss forward (e.g. with a fused linear cross-entropy).

    Stops at the first non-None result.

    :param arch: the resolved architecture (``arch.numerics.logit_scale``, ``final_logit_softcap``).
    :param module: the causal-LM module instance (a class listed in ``arch.roles.causal_lm``).
    :param model: the whole model being patched (often ``module`` itself).
    :return: a ``Replacement``, a ``Keep``, or ``None``.
    """


@hookspec(firstresult=True)
def corept_patch_experts(arch: "ResolvedArchitecture", module: "nn.Module",
                         model: "nn.Module") -> "Replacement | Keep | None":
    """Replace the forward of one mixture-of-experts experts module (stacked expert weights).

    Stops at the first non-None result. The module is called as ``experts(hidden [T, H],
    top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``; the router around it is not part of it.

    :param arch: the resolved architecture.
    :param module: the experts module instance (a class listed in ``arch.roles.experts``).
    :param model: the whole model being patched.
    :return: a ``Replacement``, a ``Keep``, or ``None``.
    """


@hookspec(firstresult=True)
def corept_patch_lora(arch: "ResolvedArchitecture", module: "nn.Module",
                      model: "nn.Module") -> "Replacement | Keep | None":
    """Fuse the LoRA adapters of one module into corept's LoRA kernels (``corept.get_peft_model``).

    Called after peft has wrapped the model's linears, once per module of the classes in
    ``arch.roles.attention`` and ``arch.roles.mlp``, then once per remaining peft LoRA linear
    outside them. A replacement of an attention module usually replaces the forwards of its
    projections (``Replacement.children``), since the attention forward calls them.

    Stops at the first non-None result.

    :param arch: the resolved architecture (``arch.projections`` names the linears).
    :param module: an attention or MLP module holding peft LoRA linears, or a peft LoRA linear.
    :param model: the whole (peft) model.
    :return: a ``Replacement``, a ``Keep``, or ``None``.
    """


COMPONENT_HOOKS = {
    "attention": "corept_patch_attention",
    "mlp": "corept_patch_mlp",
    "rope": "corept_patch_rope",
    "norm": "corept_patch_norm",
    "loss": "corept_patch_loss",
    "experts": "corept_patch_experts",
}
ALL_HOOKS = ("corept_register_architectures", *COMPONENT_HOOKS.values(), "corept_patch_lora")
