"""Peak GPU memory of one corept training step, by component and by phase.

The prediction targets ``torch.cuda.max_memory_allocated()`` over steady-state steps (after the
first optimizer step created its states). The CUDA context is outside that counter and is added
separately, as is an allocator slack for fragmentation (reserved - allocated), to decide fitting:

    required = peak_allocated * (1 + slack) + context  <=  usable VRAM * (1 - margin)

Static memory (``P``), with ``n`` parameters, ``n_q`` of them in 4-bit-quantizable Linears,
``n_lora = sum r * (in + out)`` over the LoRA targets, ``a`` the compute dtype's bytes:

* weights: ``a * n`` (16-bit LoRA, full); QLoRA: NF4 with double quantization,
  ``n_q/2`` packed + ``n_q/64`` uint8 block absmax + ``4 * ceil(n_q/16384)`` fp32 second-level
  absmax + ~2 KiB of code tables per tensor, plus ``a * (n - n_q)`` for what stays 16-bit
  (embeddings, lm_head, norms, biases);
* LoRA/QLoRA: adapters are fp32 (peft's default on 16-bit bases): params ``4 * n_lora``, grads
  ``4 * n_lora``, AdamW states ``8 * n_lora`` (adamw_8bit: ``2.03 * n_lora``);
* full fine-tuning (what ``--full-finetuning`` does with HF's Trainer: weights stay in the load
  dtype, no fp32 master copy; torch's AdamW keeps its states in the parameter's dtype):
  grads ``a * n``, states ``2 * a * n`` (adamw_8bit: ``2.03 * n``);
* ``adamw`` is torch's AdamW as ``corept train`` runs it (HF ``adamw_torch``, foreach): its step
  allocates one state-sized temporary (``sqrt(exp_avg_sq)``), ``p * n``; 8-bit AdamW none.

Phases (``N`` tokens; ``C(N)`` the layer store: ``a*H*N`` per layer for kept checkpoints, 0 when
corept offloads them (CUDA, ``N >= 512``; they go to pinned host memory), the whole saved set
for ``none``; ``A(N)`` a layer's saved set, ``X(N)`` its backward extra; see
:mod:`corept.planning.activations`):

* forward: ``P + (L-1)*C + a*H*N*3`` (embedding output, layer input, one in-flight offload) +
  the no-grad layer working set;
* loss: ``P + L*C + final-norm input + output + d hidden (3*a*H*N) + chunk * V * a`` (+ the fp32
  ``[V, H]`` weight-grad accumulator when the head trains, and one quarter of its cast gradient);
* backward, top layer (the first one differentiated): ``P + G/L + (L-1)*C + A + X``; layer 0
  (the last one, all gradients present): ``P + G + A + X`` (``A`` replaces ``C`` for the layer
  being differentiated; QLoRA adds one dequantized weight);
* optimizer step: ``P + G`` + the foreach temporary.

Plus a constant library workspace (cuBLAS/cuBLASLt) and per-sequence RoPE tables and labels.

Host side (``host_pinned``): offloaded checkpoints pin ``L`` blocks of ``a*H*N`` bytes, each rounded
up to a power of two by torch's caching host allocator (which keeps them cached between steps), so
``L * 2**ceil(log2(a*H*N))``; with ``gpus > 1`` every process pins its own. Given a
:class:`~corept.planning.host.HostMemory`, ``fits`` also requires that to fit its budget
(:mod:`corept.planning.host`). Nothing is offloaded to disk.

With ``gpus > 1`` every figure is per GPU (:mod:`corept.planning.sharding`): DDP adds its gradient
buckets; FSDP2 divides weights, adapters, gradients and optimizer states by the GPU count and adds
the gathered units (``distributed_buffers``). Activations are per process (per-device batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from corept.errors import InvalidOptionsError
from corept.planning.activations import UNPATCHED_FACTOR, layer_bytes, loss_chunk_tokens
from corept.planning.gpus import GIB, GpuProfile, get_gpu
from corept.planning.host import HostMemory, host_memory
from corept.planning.shape import ModelShape
from corept.planning.sharding import Sharding, per_gpu

METHODS = ("lora", "qlora", "full")
OPTIMS = ("adamw", "adamw_8bit")
CHECKPOINTING = ("corept", "standard", "none")
COMPONENTS = ("weights", "trainable_params", "optimizer_states", "gradients", "checkpoints",
              "layer_working_set", "loss", "hidden_states", "workspace", "distributed_buffers")
MIN_OFFLOAD_TOKENS = 512  # corept.checkpointing.MIN_OFFLOAD_TOKENS (a test keeps them equal)
WORKSPACE_BYTES = 64 * 2**20
DEFAULT_MARGIN = 0.05
DEFAULT_SLACK = 0.03
NF4_TENSOR_OVERHEAD = 2048


@dataclass
class Estimate:
    """One configuration's predicted memory (bytes); :meth:`to_dict` gives GiB for JSON."""

    model: ModelShape
    method: str
    seq: int
    batch: int
    r: int
    optim: str
    checkpointing: str
    gpu: GpuProfile
    margin: float
    slack: float
    dtype: str
    sharding: Sharding
    components: dict
    phases: dict
    peak_phase: str
    host_pinned: int
    notes: list = field(default_factory=list)
    details: dict = field(default_factory=dict)
    host: HostMemory | None = None

    @property
    def peak_allocated(self) -> int:
        return self.phases[self.peak_phase]

    @property
    def allocator_slack(self) -> int:
        return int(self.peak_allocated * self.slack)

    @property
    def cuda_context(self) -> int:
        return int(self.gpu.context_gib * GIB)

    @property
    def required(self) -> int:
        return self.peak_allocated + self.allocator_slack + self.cuda_context

    @property
    def budget(self) -> int:
        return int(self.gpu.usable_bytes * (1.0 - self.margin))

    @property
    def vram_fits(self) -> bool:
        return self.required <= self.budget

    @property
    def host_pinned_total(self) -> int:
        """Pinned host bytes of every training process on the machine (``gpus`` x ``host_pinned``)."""
        return self.host_pinned * self.sharding.gpus

    @property
    def host_budget(self) -> int | None:
        """Pinned bytes the host allows (``None``: no host given or its RAM unknown, not checked)."""
        return None if self.host is None else self.host.budget(self.sharding.gpus)

    @property
    def host_fits(self) -> bool:
        return self.host_budget is None or self.host_pinned_total <= self.host_budget

    @property
    def fits(self) -> bool:
        """VRAM fits and, when a host is given, so does the pinned host RAM."""
        return self.vram_fits and self.host_fits

    def to_dict(self) -> dict:
        g = lambda b: round(b / GIB, 3)  # noqa: E731
        return {
            "model": self.model.to_dict(), "method": self.method, "max_seq_length": self.seq,
            "batch_size": self.batch, "r": self.r if self.method != "full" else None, "optim": self.optim,
            "checkpointing": self.checkpointing, "dtype": self.dtype, "gpu": self.gpu.to_dict(),
            "gpus": self.sharding.gpus, "distributed": self.sharding.mode,
            "components_gib": {k: g(v) for k, v in self.components.items()},
            "phases_gib": {k: g(v) for k, v in self.phases.items()}, "peak_phase": self.peak_phase,
            "peak_allocated_gib": g(self.peak_allocated), "allocator_slack_gib": g(self.allocator_slack),
            "cuda_context_gib": g(self.cuda_context), "required_gib": g(self.required),
            "budget_gib": g(self.budget), "margin": self.margin, "fits": self.fits, "vram_fits": self.vram_fits,
            "host_pinned_gib": g(self.host_pinned), "host_pinned_total_gib": g(self.host_pinned_total),
            "host_fits": self.host_fits,
            "host_ram": None if self.host is None else self.host.to_dict(self.sharding.gpus),
            "details": dict(self.details), "notes": list(self.notes),
        }


def validate(method: str, seq: int, batch: int, r: int, optim: str, checkpointing: str) -> None:
    """Reject unknown names and non-positive sizes with a message naming the valid values."""
    if method not in METHODS:
        raise InvalidOptionsError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if optim not in OPTIMS:
        raise InvalidOptionsError(f"optim must be one of {', '.join(OPTIMS)}, got {optim!r}")
    if checkpointing not in CHECKPOINTING:
        raise InvalidOptionsError(f"checkpointing must be one of {', '.join(CHECKPOINTING)}, got {checkpointing!r}")
    for label, v in (("max_seq_length", seq), ("batch_size", batch), ("r", r)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise InvalidOptionsError(f"{label} must be a positive int, got {v!r}")


def weight_bytes(shape: ModelShape, method: str, a: int) -> int:
    """Frozen + trained base weights on the device (see the module docstring)."""
    if method != "qlora":
        return a * shape.n_params
    nq = shape.n_quantized
    nf4 = nq // 2 + nq // 64 + 4 * shape.n_quant_groups + NF4_TENSOR_OVERHEAD * shape.n_quant_tensors
    return nf4 + a * shape.n_unquantized


def trainable_bytes(shape: ModelShape, method: str, r: int, optim: str, a: int) -> tuple[int, int, int, int]:
    """``(n_trainable, extra param bytes, grad bytes, optimizer-state bytes)``.

    Full fine-tuning trains the weights themselves (already counted by :func:`weight_bytes`), so
    its extra parameter bytes are 0; LoRA adds fp32 adapters.
    """
    if method == "full":
        n, p, extra = shape.n_params, a, 0
    else:
        n, p = shape.lora_params(r), 4
        extra = p * n
    states = 2 * p * n if optim == "adamw" else int(n * (2 + 8 / 256))
    return n, extra, p * n, states


def dequant_bytes(shape: ModelShape, method: str, a: int) -> int:
    """QLoRA: the largest 4-bit weight dequantized for one matmul (plus its fp32 absmax)."""
    if method != "qlora":
        return 0
    biggest = max((lin.numel for lin in shape.layer.linears.values()), default=0)
    return a * biggest + biggest // 16


def pinned_block(nbytes: int) -> int:
    """What torch's caching host allocator pins for ``nbytes``: the next power of two."""
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


def estimate(shape: ModelShape, *, method: str = "lora", seq: int = 2048, batch: int = 1, r: int = 16,
             optim: str = "adamw", checkpointing: str = "corept", gpu: GpuProfile | str | None = None,
             margin: float = DEFAULT_MARGIN, slack: float = DEFAULT_SLACK, gpus: int = 1,
             distributed: str | None = None, host: HostMemory | float | None = None) -> Estimate:
    """Predict the peak of one training step for ``shape`` (see the module docstring).

    :param gpus: GPUs training together (one process each; ``batch`` is per GPU).
    :param distributed: ``"ddp"`` (default with ``gpus > 1``) or ``"fsdp"``; figures are per GPU.
    :param host: the machine's RAM, a :class:`~corept.planning.host.HostMemory` or GiB (as
        ``plan(host_ram=...)``); ``fits`` then also checks the pinned host RAM. ``None``: not checked.
    """
    validate(method, seq, batch, r, optim, checkpointing)
    host = None if host is None else host_memory(host)  # GiB of RAM or a HostMemory
    sharding = Sharding.of(gpus, distributed)
    gpu = get_gpu(gpu) if not isinstance(gpu, GpuProfile) else gpu
    a = 4 if (shape.force_float32 and not gpu.bf16) else 2
    dtype = "fp32" if a == 4 else ("bf16" if gpu.bf16 else "fp16")
    H, L, V, N, S = shape.hidden, shape.layers, shape.vocab, batch * seq, seq
    attention = "varlen" if shape.layer.attention == "varlen" else \
        "flash" if (shape.layer.attention == "sdpa" and gpu.flash) else "eager"
    lb = layer_bytes(shape, method, r, a, attention, tokens=N)
    saved = lb.saved_per_token(S) * N
    notes = list(shape.notes)
    if attention == "eager" and shape.layer.attention == "sdpa":
        notes.append(f"{gpu.name} has no FlashAttention: SDPA's math fallback (O(seq^2) scores) is approximate")

    weights = weight_bytes(shape, method, a)
    n_train, params, grads, states = trainable_bytes(shape, method, r, optim, a)
    nf4_side = weights - shape.n_quantized // 2 - a * shape.n_unquantized if method == "qlora" else 0
    head_trains = method == "full"
    grad_top = grads / shape.layers if not head_trains else (a * V * H + (grads - a * V * H) / L)
    split = per_gpu(shape, sharding, method=method, a=a, weights=weights, params=params, grads=grads,
                    states=states, grad_top=grad_top, nf4_side=nf4_side)
    weights, params, grads, states, grad_top = (split.weights, split.trainable_params, split.gradients,
                                                split.optimizer_states, split.grad_top)
    static = {"weights": weights, "trainable_params": params, "optimizer_states": states}

    offload = checkpointing == "corept" and N >= MIN_OFFLOAD_TOKENS
    if checkpointing == "none":
        store, pinned = saved, 0
    elif offload:
        store, pinned = 0, pinned_block(a * H * N) * L
    else:
        store, pinned = a * H * N, 0
    seq_tables = 2 * a * S * shape.head_dim + 8 * S + 24 * N  # cos/sin, position ids, ids/labels/targets
    workspace = WORKSPACE_BYTES + seq_tables
    deq = dequant_bytes(shape, method, a)

    def phase(name, ckpt=0, layer=0, loss=0, hidden=0, grad=0):
        return {**static, "gradients": int(grad), "checkpoints": int(ckpt), "layer_working_set": int(layer),
                "loss": int(loss), "hidden_states": int(hidden), "workspace": int(workspace),
                "distributed_buffers": split.buffers[name]}

    chunk = loss_chunk_tokens(N, H, V, a)
    if shape.patched:
        loss = chunk * V * a + a * H * N + 8 * N
    else:  # transformers' loss: [N, V] logits, their fp32 upcast and log-softmax
        loss = (a + 8) * V * N
        notes.append("unpatched loss materializes [tokens, vocab] logits (approximate)")
    if head_trains:
        loss += 4 * V * H  # fp32 grad accumulator of the fused loss, forward -> backward
    recomputed_out = checkpointing == "corept"
    bwd_layer = saved + lb.backward_extra(S, recomputed_out, a, H) * N + deq + lb.chunk_bytes
    phases = {
        "forward": phase("forward", ckpt=(L - 1) * store,
                         layer=lb.forward_extra(S) * N + deq + lb.chunk_bytes,
                         hidden=a * H * N * (3 if offload else 2)),
        "loss": phase("loss", ckpt=L * store, loss=loss, hidden=2 * a * H * N + 4 * N,
                      grad=a * V * H // 4 if head_trains else 0),  # backward casts the fp32 grad in 4 slices
        "backward (top layer)": phase("backward (top layer)", ckpt=(L - 1) * store, layer=bwd_layer, grad=grad_top),
        "backward (layer 0)": phase("backward (layer 0)", layer=bwd_layer, grad=grads),
        "optimizer step": phase("optimizer step", grad=grads),
    }
    phases["optimizer step"]["optimizer_states"] += states // 2 if optim == "adamw" else 0  # foreach temp
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    if not shape.patched:
        notes.append(f"no corept patches: layer activations scaled by {UNPATCHED_FACTOR} (measured on an 8B dense model)")
    est = Estimate(model=shape, method=method, seq=seq, batch=batch, r=r, optim=optim, checkpointing=checkpointing,
                   gpu=gpu, margin=margin, slack=slack, dtype=dtype, sharding=sharding, components=phases[peak_phase],
                   phases=totals, peak_phase=peak_phase, host_pinned=pinned, notes=notes, host=host)
    est.details = {"n_trainable": n_train, "loss_chunk_tokens": chunk, "layer_saved_per_token": lb.saved_per_token(S),
                   "layer_backward_extra_per_token": lb.backward_extra(S, recomputed_out, a, H),
                   "offloaded": offload, "attention": attention, "host_pinned_data": a * H * N * L if offload else 0}
    if sharding.mode is not None and pinned:
        notes.append(f"pinned host RAM is per process: {sharding.gpus} x {pinned / GIB:.1f} GiB on the machine")
    if shape.max_positions and seq > shape.max_positions:
        notes.append(f"seq {seq} exceeds the model's max_position_embeddings {shape.max_positions}")
    return est
