"""How many decoder layers may keep their activations (the rest recomputed) within a GPU budget.

``use_gradient_checkpointing="auto"`` (:mod:`corept.training.recompute_policy`) asks this per batch
shape. Two estimates bound it: every activation kept (``checkpointing="none"``) and every layer
recomputed with its input offloaded (``"corept"``). Each kept layer adds its saved set to the
peak, so the peak with ``K`` kept layers is taken as linear between the two; ``K`` is the largest
that fits the budget (the GPU's usable memory less the planner's margin, slack and CUDA context),
less :data:`AUTO_HEADROOM` more.
"""
from __future__ import annotations

from dataclasses import dataclass

from corept.planning.estimate import estimate
from corept.planning.gpus import GIB, GpuProfile
from corept.planning.shape import ModelShape


AUTO_HEADROOM = 0.10
"""Share of the budget ``keep_plan`` leaves free beyond the planner's own margin. The all-kept peak
rests on per-layer saved sets that the tests check against autograd, but it has not been measured
end to end on a GPU the way the recompute modes were (docs/planning.md); running out of memory
mid-step costs the user more than one recomputed layer costs time."""


@dataclass(frozen=True)
class KeepPlan:
    """``keep_layers`` of ``layers`` keep their activations; the figures behind it, in GiB."""

    keep_layers: int
    layers: int
    required_gib: float
    budget_gib: float
    all_kept_gib: float
    all_recomputed_gib: float


def keep_plan(shape: ModelShape, gpu: GpuProfile, *, method: str, seq: int, batch: int, r: int) -> KeepPlan:
    """The :class:`KeepPlan` for one training step of ``batch`` x ``seq`` tokens on ``gpu``."""
    kept = estimate(shape, method=method, seq=seq, batch=batch, r=r, checkpointing="none", gpu=gpu)
    lean = estimate(shape, method=method, seq=seq, batch=batch, r=r, checkpointing="corept", gpu=gpu)
    L = shape.layers
    per_layer = max(0.0, (kept.required - lean.required) / L)
    budget = kept.budget * (1.0 - AUTO_HEADROOM)
    room = budget - lean.required
    if kept.required <= budget:
        k = L
    else:
        k = 0 if room <= 0 or per_layer <= 0 else min(L, int(room // per_layer))
    return KeepPlan(k, L, round((lean.required + k * per_layer) / GIB, 2), round(budget / GIB, 2),
                    round(kept.required / GIB, 2), round(lean.required / GIB, 2))
