"""The VRAM planner: what fits on one GPU, from the model's config alone (no weights).

* :func:`plan` / :func:`recommend` (:mod:`.recommend`): estimate a configuration, or search the
  largest sequence, batch and rank that fit with a margin; ``recommend`` is what
  ``corept train --profile auto`` calls.
* :func:`estimate` (:mod:`.estimate`): peak memory by component and phase.
* :mod:`.activations`: per-token activation formulas of one decoder layer.
* :func:`model_shape` (:mod:`.shape`): exact parameter counts from a meta-device model.
* :data:`GPUS`, :func:`get_gpu`, :func:`detect_gpu` (:mod:`.gpus`): GPU profiles.
* :func:`host_memory`, :func:`detect_host_memory` (:mod:`.host`): the host RAM that the pinned
  memory of offloaded checkpoints must fit (a constraint like VRAM).

See docs/planning.md for the formulas, their validation and the RTX 3090 table.
"""
from corept.planning.estimate import Estimate, estimate
from corept.planning.gpus import GPUS, GpuProfile, detect_gpu, get_gpu
from corept.planning.host import HostMemory, detect_host_memory, host_memory
from corept.planning.recommend import DoesNotFitError, Plan, plan, recommend
from corept.planning.shape import ModelShape, PlanError, model_shape

__all__ = ["plan", "recommend", "estimate", "model_shape", "get_gpu", "detect_gpu", "GPUS", "GpuProfile",
           "Plan", "Estimate", "ModelShape", "PlanError", "DoesNotFitError", "HostMemory", "host_memory",
           "detect_host_memory"]
