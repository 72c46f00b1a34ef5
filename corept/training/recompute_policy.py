"""``use_gradient_checkpointing="auto"``: recompute only when keeping the activations would not fit.

Recomputing every layer in backward costs one more forward per step (about a quarter of an 8B
step at 2×2048 on an H100, where the step is bound by its GEMMs). A short-row batch on a large GPU
usually fits without it. So per batch shape ``[B, S]`` (decided at the first call with that shape,
then cached), :class:`AutoPolicy` asks the planner (:func:`corept.planning.recompute.keep_plan`,
built on the estimates ``corept plan`` gives) how many layers ``K`` may keep their activations
within the budget. The kept layers are the *last* ``K``: backward
reaches them first and frees their activations before the recomputed layers below need memory.
The others take corept's offloaded recompute (``"corept"`` mode, the lean one).

Budget: ``memory_budget_gib`` when given, else what this process may use of the GPU (its total
under torch's per-process memory fraction, less other processes' memory); the planner's margin
(5%), allocator slack (3%), CUDA context and 10% more come off it. Off CUDA, and in multi-process runs (whose
per-GPU figures depend on the engine), every call recomputes, as ``"corept"`` does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger("corept")


def _capacity_gib(device: torch.device) -> float | None:
    """GPU memory this process may use, in GiB: the device's total under torch's per-process
    fraction (``set_per_process_memory_fraction``), less what other processes hold; ``None`` when
    it cannot be read."""
    try:
        free, total = torch.cuda.mem_get_info(device)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
        return min(total * fraction, free + torch.cuda.memory_reserved(device)) / 2 ** 30
    except Exception:  # noqa: BLE001 - no CUDA runtime, a fake device in tests: the profile's total
        return None


@dataclass(frozen=True)
class Decision:
    """What :class:`AutoPolicy` chose for one batch shape, and the planner's figures behind it."""

    keep_layers: int
    layers: int
    required_gib: float | None
    budget_gib: float | None
    why: str

    @property
    def keep(self) -> bool:
        """Every layer keeps its activations."""
        return self.layers > 0 and self.keep_layers == self.layers

    def describe(self) -> str:
        if self.keep:
            what = "keep activations"
        elif self.keep_layers == 0:
            what = "recompute (offloaded)"
        else:
            what = f"keep the last {self.keep_layers} of {self.layers} layers, recompute the rest"
        return f"{what}: {self.why}"


class AutoPolicy:
    """Per batch shape, keep a decoder layer's activations or recompute them (module notes).

    :param model: the model being trained (a peft model or a transformers one).
    :param memory_budget_gib: GPU memory the step may take; ``None``: what this process may use.
    """

    def __init__(self, model: torch.nn.Module, memory_budget_gib: float | None = None):
        if memory_budget_gib is not None and memory_budget_gib <= 0:
            raise ValueError(f"memory_budget_gib must be positive, got {memory_budget_gib!r}")
        self.model, self.budget = model, memory_budget_gib
        self.decisions: dict[tuple[int, int], Decision] = {}
        self._index: dict[int, int] = {}  # id(decoder layer) -> its position among the checkpointed layers

    def keep(self, hidden: torch.Tensor, layer: torch.nn.Module | None = None) -> bool:
        """Whether ``layer`` (a decoder layer; ``None``: any) called on ``hidden`` ``[B, S, H]``
        keeps its activations."""
        if not hidden.is_cuda:
            return False
        key = (hidden.shape[0], hidden.shape[1]) if hidden.dim() == 3 else (1, hidden.numel() // hidden.shape[-1])
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.decisions[key] = self._decide(*key, hidden.device)
            logger.info("corept: checkpointing auto for batch %dx%d: %s", *key, decision.describe())
        if decision.keep or decision.keep_layers == 0:
            return decision.keep
        return self._position(layer) >= decision.layers - decision.keep_layers

    def _position(self, layer) -> int:
        if not self._index:
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            # the checkpointed decoder layers (the model itself carries the flag too: skip modules
            # holding other checkpointed modules)
            marked = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)
                      and hasattr(m, "_gradient_checkpointing_func")]
            layers = [m for m in marked if not any(c is not m and c in marked for c in m.modules())]
            self._index = {id(m): i for i, m in enumerate(layers)}
        return self._index.get(id(layer), -1)  # an unknown module recomputes

    def describe(self) -> str:
        """The report line: the decision per batch shape seen so far."""
        if not self.decisions:
            return "auto (no batch yet)"
        return "auto: " + "; ".join(f"{b}x{s} {d.describe()}" for (b, s), d in sorted(self.decisions.items()))

    def _method_and_rank(self) -> tuple[str, int]:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        opts = getattr(base, "corept_load_options", None)
        if opts is not None and opts.full_finetuning:
            return "full", 16
        config = next(iter(getattr(self.model, "peft_config", {}).values()), None)
        rank = int(getattr(config, "r", 16) or 16)
        return ("qlora" if getattr(base, "is_loaded_in_4bit", False) else "lora"), rank

    def _decide(self, batch: int, seq: int, device: torch.device) -> Decision:
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            return Decision(0, 0, None, None, "multi-process run (the planner's per-GPU figures depend on the engine)")
        from corept.planning import detect_gpu, get_gpu, model_shape
        from corept.planning.recompute import keep_plan

        method, rank = self._method_and_rank()
        try:
            shape = model_shape(self.model.config)
            gpu = detect_gpu(device.index if device.index is not None else torch.cuda.current_device())
            capacity = self.budget if self.budget is not None else _capacity_gib(device)
            if capacity is not None and (self.budget is not None or capacity < gpu.usable_gib):
                gpu = get_gpu(gpu, vram_gib=capacity)
            plan = keep_plan(shape, gpu, method=method, seq=seq, batch=batch, r=rank)
        except Exception as exc:  # noqa: BLE001 - the planner cannot model this model: the lean choice
            return Decision(0, 0, None, None, f"the planner could not model it ({type(exc).__name__}: {exc})")
        source = f"memory_budget_gib={self.budget:g}" if self.budget is not None else gpu.label
        why = (f"planner: {plan.required_gib:.1f} GiB (all kept: {plan.all_kept_gib:.1f}, all recomputed: "
               f"{plan.all_recomputed_gib:.1f}), budget {plan.budget_gib:.1f} GiB ({source})")
        return Decision(plan.keep_layers, plan.layers, plan.required_gib, plan.budget_gib, why)
