"""corept: fast, lean LLM fine-tuning by patching transformers models with Triton kernels.

The core knows no architecture by name: plugins (entry-point group ``corept``) declare them.
"""
from corept.architecture import COMPONENTS, Architecture, FromConfig, ModuleRoles, Quirks
from corept.errors import (CoreptError, InvalidOptionsError, ModelNotFoundError, PluginConflictError,
                           PluginLoadError, UnsupportedArchitectureError)
from corept.hookspecs import hookimpl
from corept.patching import is_patched, patch, report, unpatch
from corept.plugin_base import ArchitecturePlugin
from corept.plugins import get_plugin_manager, register_plugin, reset_plugin_manager, unregister_plugin
from corept.replacement import Replacement
from corept.report import PatchReport

__version__ = "0.1.0"


def get_peft_model(*args, **kwargs):
    """Add LoRA adapters with corept's fused kernels; see :func:`corept.lora_setup.get_peft_model`."""
    from corept.lora_setup import get_peft_model as _get_peft_model

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
    """Load a model and tokenizer, pick its plugin and patch it; see :func:`corept.loading.load`."""
    from corept.loading import load as _load

    return _load(*args, **kwargs)


__all__ = [
    "COMPONENTS", "Architecture", "ArchitecturePlugin", "FromConfig", "ModuleRoles", "Quirks", "Replacement",
    "PatchReport", "hookimpl", "load", "plan", "get_peft_model", "save", "patch", "unpatch", "report", "is_patched",
    "get_plugin_manager", "register_plugin", "unregister_plugin", "reset_plugin_manager",
    "CoreptError", "InvalidOptionsError", "ModelNotFoundError", "PluginConflictError", "PluginLoadError",
    "UnsupportedArchitectureError",
]
