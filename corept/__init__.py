"""corept: fast, lean LLM fine-tuning by patching transformers models with Triton kernels.

The core knows no architecture by name: plugins (entry-point group ``corept``) declare them.
"""
from corept.errors import (CheckpointError, CoreptError, InvalidOptionsError, ModelNotFoundError,
                           PluginConflictError, PluginHookError, PluginLoadError, UnsupportedArchitectureError)
from corept.patching import Keep, PatchReport, Replacement, architecture_of, is_patched, patch, report, unpatch
from corept.registry.declarations import (COMPONENTS, Architecture, EmbeddedModel, GGUFExport, KnownModel,
                                          ModuleRoles, Projections)
from corept.registry.hookspecs import hookimpl
from corept.registry.manager import get_plugin_manager, register_plugin, reset_plugin_manager, unregister_plugin
from corept.registry.plugin_base import ArchitecturePlugin
from corept.registry.quirks import FromConfig, LoadPolicy, Numerics, Recorded
from corept.registry.resolution import ResolvedArchitecture, resolve
from corept.training.responses_only import train_on_responses_only

__version__ = "0.1.0"


def get_peft_model(*args, **kwargs):
    """Add LoRA adapters with corept's fused kernels; see :func:`corept.lora.setup.get_peft_model`."""
    from corept.lora.setup import get_peft_model as _get_peft_model

    return _get_peft_model(*args, **kwargs)


def save(*args, **kwargs):
    """Save adapters or merged weights atomically (safetensors); see :func:`corept.saving.save`."""
    from corept.saving import save as _save

    return _save(*args, **kwargs)


def plan(*args, **kwargs):
    """Plan GPU memory from the config alone (what fits); see :func:`corept.planning.plan`."""
    from corept.planning import plan as _plan

    return _plan(*args, **kwargs)


def load(*args, **kwargs):
    """Load a model and tokenizer, pick its plugin and patch it; see :func:`corept.loading.loader.load`."""
    from corept.loading.loader import load as _load

    return _load(*args, **kwargs)


__all__ = [
    "COMPONENTS", "Architecture", "ArchitecturePlugin", "EmbeddedModel", "FromConfig", "GGUFExport", "KnownModel",
    "LoadPolicy", "ModuleRoles", "Numerics", "Projections", "Recorded", "ResolvedArchitecture", "Keep", "Replacement",
    "PatchReport", "hookimpl", "load", "plan", "get_peft_model", "save", "patch", "unpatch", "report", "is_patched",
    "architecture_of", "resolve", "get_plugin_manager", "register_plugin", "unregister_plugin",
    "reset_plugin_manager", "CheckpointError", "CoreptError", "InvalidOptionsError", "PluginHookError",
    "ModelNotFoundError", "PluginConflictError",
    "PluginLoadError", "UnsupportedArchitectureError", "train_on_responses_only",
]
