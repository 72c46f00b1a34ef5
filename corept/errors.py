"""Exceptions corept raises. Every message says what went wrong and what to do about it."""
from __future__ import annotations


class CoreptError(Exception):
    """Base class of corept's own errors."""


class UnsupportedArchitectureError(CoreptError):
    """No installed plugin claims the model's ``model_type`` (raised with ``strict=True``)."""


class PluginConflictError(CoreptError):
    """Two plugins claim one ``model_type`` and neither declares a higher priority."""


class PluginLoadError(CoreptError):
    """A plugin failed validation (e.g. it implements a hook that does not exist)."""


class InvalidOptionsError(CoreptError, ValueError):
    """Options that contradict each other, detected before anything is downloaded or loaded."""


class ModelNotFoundError(CoreptError, FileNotFoundError):
    """A model name that is neither a local folder, in the HF cache, nor reachable on the hub."""


class CheckpointError(CoreptError):
    """A model folder that cannot be read as it is: a corrupt file (named), an unknown model type, or
    (with ``strict=True``) weights missing from or unexpected in the checkpoint."""


class PluginHookError(CoreptError):
    """A plugin's hook raised while corept patched a model (the plugin is named)."""
