"""The shared components: kernel-backed replacements for every declared architecture, answered
through the built-in plugin :mod:`.plugin`. Each component module (:mod:`.norm`, :mod:`.mlp`,
:mod:`.rope`, :mod:`.head`, :mod:`.lora`) imports ``corept_kernels`` and is imported on first use;
:mod:`.probe` proves each replacement's math at patch time.

Nothing is imported here: loading plugins (``import corept.components.plugin``) must not import
the kernels, whose ``@triton.jit`` decorators fix the Triton mode when they first run.
"""
