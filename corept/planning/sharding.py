"""Per-GPU memory with N GPUs: DDP replicas or FSDP2 shards (one process per GPU, per-device batch).

* **DDP** keeps a whole replica per GPU, so every single-GPU term stays; DDP adds its gradient
  buckets, flat copies of the trainable gradients (``gradient_as_bucket_view=False``, the default),
  for the whole run: ``buffers = G``.
* **FSDP2** (``corept.distributed.fsdp.shard`` or accelerate's FSDP2 plugin: one unit per decoder
  layer, resharded after forward; embedding, final norm and ``lm_head`` stay gathered for the whole
  step, as the root unit does). Per GPU, with ``U`` one decoder layer's parameter bytes and ``R``
  the root's (embedding + ``lm_head`` + final norm):

  - weights, trainable parameters, gradients and optimizer states: ``1/N`` each, except what
    bitsandbytes keeps outside the parameters (NF4 block scales and code tables: replicated);
  - buffers: the root gathered (``R``) in every phase but the optimizer step; two layer units
    gathered in forward and backward (the one computing and the one prefetched); in backward one
    unit's unsharded gradients before their reduce-scatter (and, for full fine-tuning, the root's);
  - activations, the loss chunk and the offloaded checkpoints are per process and do not change.

The layer-unit size is the mean over layers (``(n - root) / L``), exact for uniform decoders.
Communication buffers of NCCL itself (a few hundred MiB, outside PyTorch's allocator) are not
counted; the CUDA context term covers part of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from corept.errors import InvalidOptionsError

MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Sharding:
    """How many GPUs and which engine; ``mode`` ``None`` means one GPU."""

    gpus: int = 1
    mode: str | None = None

    @staticmethod
    def of(gpus: int = 1, mode: str | None = None) -> "Sharding":
        """Validated; ``gpus > 1`` without a mode means DDP, one GPU means no mode."""
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
            raise InvalidOptionsError(f"gpus must be a positive int, got {gpus!r}")
        if mode is not None and mode not in MODES:
            raise InvalidOptionsError(f"distributed must be one of {', '.join(MODES)}, got {mode!r}")
        if gpus == 1:
            return Sharding(1, None)
        return Sharding(gpus, mode or "ddp")

    @property
    def label(self) -> str:
        return "1 GPU" if self.mode is None else f"{self.gpus} GPUs, {self.mode} (per-GPU figures)"


def root_params(shape) -> int:
    """Parameters outside the decoder layers: input embedding, untied ``lm_head``, final norm."""
    return shape.vocab * shape.hidden * (1 if shape.tied else 2) + shape.hidden


@dataclass
class ShardedTerms:
    """The single-GPU terms divided per GPU, and the extra buffers per phase (bytes)."""

    weights: int
    trainable_params: int
    optimizer_states: int
    gradients: int
    grad_top: int
    buffers: dict


def per_gpu(shape, sharding: Sharding, *, method: str, a: int, weights: int, params: int, grads: int,
            states: int, grad_top: int, nf4_side: int) -> ShardedTerms:
    """Divide the static terms of one GPU across ``sharding`` and add its buffers per phase.

    :param nf4_side: bytes of NF4 block scales and code tables (QLoRA; kept whole on every GPU).
    :param grad_top: gradient bytes present while the top layer is differentiated (one GPU).
    """
    phases = ("forward", "loss", "backward (top layer)", "backward (layer 0)", "optimizer step")
    if sharding.mode is None:
        return ShardedTerms(weights, params, states, grads, grad_top, dict.fromkeys(phases, 0))
    n = sharding.gpus
    if sharding.mode == "ddp":
        return ShardedTerms(weights, params, states, grads, grad_top, dict.fromkeys(phases, grads))
    root = a * root_params(shape)
    layers = max(1, shape.layers)
    unit = (weights - nf4_side - root) / layers + params / layers  # one gathered layer (+ its adapters)
    unit_grads = grads / layers if method != "full" else a * (shape.n_params - root_params(shape)) / layers
    root_grads = root if method == "full" else 0
    gathered = root + 2 * unit
    buffers = {"forward": gathered, "loss": root,
               "backward (top layer)": gathered + unit_grads + root_grads,
               "backward (layer 0)": gathered + unit_grads + root_grads, "optimizer step": 0}
    return ShardedTerms(weights=int((weights - nf4_side) / n + nf4_side), trainable_params=int(params / n),
                        optimizer_states=int(states / n), gradients=int(grads / n), grad_top=int(grad_top / n),
                        buffers={k: int(v) for k, v in buffers.items()})
