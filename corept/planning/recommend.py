"""What fits: the recommendation search, the fit check and the "smallest change that would fit".

Policy (every number below is a parameter):

* **rank**: the given ``r``, else 64 under 4B parameters, 32 under 20B, 16 above (the seed's RTX
  3090 practice); halved (down to 8) only when nothing fits at the shortest sequence.
* **longest sequence at batch 1**: the largest multiple of 256 up to the model's
  ``max_position_embeddings`` whose plan fits (memory grows monotonically with tokens once
  corept offloads checkpoints, from 512 tokens; shorter ones are checked one by one).
* **recommended (seq, batch)**: ``seq`` = the given one, else ``min(2048, longest at batch 1)``;
  ``batch`` = the given one, else the largest power of two ``<= target_batch`` that fits at that
  ``seq``; ``grad_accum = ceil(target_batch / (batch * gpus))`` (effective batch ``>= target_batch``).
* **N GPUs** (``gpus``, ``distributed``): every figure is per GPU and ``batch`` is per GPU
  (:mod:`corept.planning.sharding`).

"Fits" means ``peak_allocated * (1 + slack) + CUDA context <= usable VRAM * (1 - margin)``
(:mod:`corept.planning.estimate`) **and** the pinned host RAM of the offloaded checkpoints (every
process's) fits the host's budget (:mod:`corept.planning.host`: the detected RAM, or ``host_ram``
GiB); the search never returns a configuration that breaks either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from corept.planning.estimate import DEFAULT_MARGIN, Estimate, estimate, validate
from corept.planning.gpus import GIB, GPUS, GpuProfile, get_gpu
from corept.planning.host import HostMemory, host_memory, ram_for
from corept.planning.shape import ModelShape, PlanError, model_shape

SEQ_STEP = 256
DEFAULT_SEQ = 2048
MIN_RANK = 8


class DoesNotFitError(PlanError):
    """Nothing (or not the requested configuration) fits; ``suggestions`` lists what would."""

    def __init__(self, message: str, suggestions: list[str] | None = None):
        self.suggestions = list(suggestions or [])
        if self.suggestions:
            message += " Smallest change that would fit: " + self.suggestions[0] + "." + (
                " Other options: " + "; ".join(self.suggestions[1:]) + "." if len(self.suggestions) > 1 else "")
        super().__init__(message)


@dataclass
class Plan:
    """The answer of :func:`plan`: one estimate plus, when searched, the recommendation."""

    estimate: Estimate
    recommendation: dict | None = None
    longest_seq_at_batch_1: int | None = None
    suggestions: list = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.estimate.fits

    def to_dict(self) -> dict:
        return {"estimate": self.estimate.to_dict(), "recommendation": self.recommendation,
                "longest_seq_at_batch_1": self.longest_seq_at_batch_1, "fits": self.fits,
                "suggestions": list(self.suggestions)}


def default_rank(shape: ModelShape) -> int:
    """64 under 4B parameters, 32 under 20B, else 16."""
    return 64 if shape.n_params < 4e9 else 32 if shape.n_params < 20e9 else 16


def seq_cap(shape: ModelShape) -> int:
    return int(shape.max_positions or 131072)


def _fits(shape, gpu, margin, **cfg) -> bool:
    return estimate(shape, gpu=gpu, margin=margin, **cfg).fits


def longest_seq(shape: ModelShape, gpu: GpuProfile, margin: float = DEFAULT_MARGIN, *, batch: int = 1,
                cap: int | None = None, **cfg) -> int:
    """The largest multiple of :data:`SEQ_STEP` (``<= cap``) that fits at ``batch``, or 0."""
    cap = (cap or seq_cap(shape)) // SEQ_STEP * SEQ_STEP
    if cap < SEQ_STEP:
        return 0
    ok = lambda s: _fits(shape, gpu, margin, seq=s, batch=batch, **cfg)  # noqa: E731
    lo_mono = max(SEQ_STEP, -(-512 // (batch * SEQ_STEP)) * SEQ_STEP)  # from here on, offloaded: monotone
    best = 0
    if lo_mono <= cap and ok(lo_mono):
        lo, hi = lo_mono // SEQ_STEP, cap // SEQ_STEP  # invariant: lo fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid * SEQ_STEP) else (lo, mid - 1)
        best = lo * SEQ_STEP
    else:
        for s in range(min(lo_mono, cap + SEQ_STEP) - SEQ_STEP, 0, -SEQ_STEP):
            if ok(s):
                return s
    return best


def largest_batch(shape: ModelShape, gpu: GpuProfile, margin: float, *, seq: int, limit: int, **cfg) -> int:
    """The largest power of two ``<= limit`` that fits at ``seq``, or 0."""
    b, best = 1, 0
    while b <= max(1, limit):
        if not _fits(shape, gpu, margin, seq=seq, batch=b, **cfg):
            break
        best, b = b, b * 2
    return best


def suggestions(shape: ModelShape, gpu: GpuProfile, margin: float, *, method: str, seq: int, batch: int, r: int,
                optim: str, checkpointing: str, gpus: int = 1, distributed: str | None = None,
                host: HostMemory | None = None) -> list[str]:
    """Single changes that make the configuration fit (VRAM and pinned host RAM), the smallest first."""
    cfg = dict(method=method, r=r, optim=optim, checkpointing=checkpointing, gpus=gpus, distributed=distributed,
               host=host)
    out = []
    if batch > 1:
        b = largest_batch(shape, gpu, margin, seq=seq, limit=batch - 1, **cfg)
        if b:
            out.append(f"--batch-size {b} (raise --grad-accum to keep the effective batch)")
    s = longest_seq(shape, gpu, margin, batch=batch, cap=seq - 1, **cfg)
    if s:
        out.append(f"seq <= {s} (--max-seq-length {s})")
    alt = dict(cfg, seq=seq, batch=batch)
    if checkpointing != "corept" and _fits(shape, gpu, margin, **dict(alt, checkpointing="corept")):
        out.append("--checkpointing corept (offload layer inputs to pinned CPU memory)")
    if checkpointing == "corept" and _fits(shape, gpu, margin, **dict(alt, checkpointing="standard")):
        out.append("--checkpointing standard (corept train --gradient-checkpointing true: layer inputs stay on "
                   "the GPU, no pinned host RAM)")
    if optim == "adamw" and _fits(shape, gpu, margin, **dict(alt, optim="adamw_8bit")):
        out.append("--optim adamw_8bit")
    if method != "full":
        rr = r // 2
        while rr >= 4 and not _fits(shape, gpu, margin, **dict(alt, r=rr)):
            rr //= 2
        if rr >= 4:
            out.append(f"--r {rr}")
    if method == "full" and _fits(shape, gpu, margin, **dict(alt, method="lora")):
        out.append("--method lora (train adapters instead of every weight)")
    if method != "qlora" and _fits(shape, gpu, margin, **dict(alt, method="qlora")):
        out.append("use --load-in-4bit / --method qlora (corept.load(..., load_in_4bit=True))")
    bigger = [g for g in sorted(GPUS.values(), key=lambda g: g.usable_gib)
              if g.usable_gib > gpu.usable_gib and _fits(shape, g, margin, **alt)]
    if bigger:
        out.append(f"a GPU with >= {bigger[0].usable_gib:.0f} GiB (e.g. --gpu {bigger[0].name})")
    for n in (2, 4, 8):
        if (n > gpus or distributed != "fsdp") and n >= gpus and _fits(shape, gpu, margin,
                                                                     **dict(alt, gpus=n, distributed="fsdp")):
            out.append(f"--gpus {n} --distributed fsdp (FSDP2 shards across {n} {gpu.name}s)")
            break
    est = estimate(shape, gpu=gpu, margin=margin, **alt)
    if est.vram_fits and not est.host_fits:
        need = ram_for(est.host_pinned_total, est.sharding.gpus)
        out.append(f"a machine with >= {math.ceil(round(need, 6))} GiB of free RAM (plan for it with --host-ram)")
    return out


def _host_line(est: Estimate) -> str:
    """Pinned host RAM needed vs the budget, for errors."""
    return (f"it needs {est.host_pinned_total / GIB:.2f} GiB of pinned host RAM for the offloaded checkpoints, "
            f"{est.host.describe(est.sharding.gpus)}")


def _resolve(model, method, gpu, vram, r, optim, checkpointing, trust_remote_code):
    shape = model if isinstance(model, ModelShape) else model_shape(model, trust_remote_code=trust_remote_code)
    gpu = get_gpu(gpu, vram_gib=vram) if not isinstance(gpu, GpuProfile) else gpu
    validate(method, 1, 1, 1 if r is None else r, optim, checkpointing)
    return shape, gpu


def plan(model, method: str = "lora", *, gpu=None, vram: float | None = None, max_seq_length: int | None = None,
         batch_size: int | None = None, r: int | None = None, optim: str = "adamw",
         checkpointing: str = "corept", target_batch: int = 16, margin: float = DEFAULT_MARGIN,
         trust_remote_code: bool = False, gpus: int = 1, distributed: str | None = None,
         host_ram: float | HostMemory | None = None) -> Plan:
    """Plan ``model`` on ``gpu``: the estimate of the given configuration, or the recommended one.

    With both ``max_seq_length`` and ``batch_size`` it estimates that configuration (``fits`` may
    be False; ``suggestions`` then say what would fit). Otherwise it searches (see the module
    docstring) and raises :class:`DoesNotFitError` when nothing fits.

    :param host_ram: GiB of RAM of the machine that trains (all of it available), or a
        :class:`~corept.planning.host.HostMemory`; ``None``: this machine's, detected. The pinned
        host RAM of offloaded checkpoints must fit its budget (:mod:`corept.planning.host`).
    """
    shape, gpu = _resolve(model, method, gpu, vram, r, optim, checkpointing, trust_remote_code)
    if not isinstance(target_batch, int) or target_batch < 1:
        raise PlanError(f"target_batch must be a positive int, got {target_batch!r}")
    host = host_memory(host_ram)
    rank = default_rank(shape) if r is None else r
    cfg = dict(method=method, optim=optim, checkpointing=checkpointing, gpus=gpus, distributed=distributed, host=host)
    if max_seq_length is not None and batch_size is not None:
        est = estimate(shape, seq=max_seq_length, batch=batch_size, r=rank, gpu=gpu, margin=margin, **cfg)
        sugg = [] if est.fits else suggestions(shape, gpu, margin, seq=max_seq_length, batch=batch_size, r=rank, **cfg)
        rec = _recommendation(est, target_batch, None) if est.fits else None
        return Plan(est, rec, None, sugg)
    while True:
        longest = longest_seq(shape, gpu, margin, batch=batch_size or 1, r=rank, **cfg)
        if longest or r is not None or rank // 2 < MIN_RANK:
            break
        rank //= 2
    if not longest:
        sugg = suggestions(shape, gpu, margin, seq=SEQ_STEP, batch=batch_size or 1, r=rank, **cfg)
        need = estimate(shape, seq=SEQ_STEP, batch=batch_size or 1, r=rank, gpu=gpu, margin=margin, **cfg)
        where = gpu.name if gpus == 1 else f"{gpus} x {gpu.name} ({need.sharding.mode})"
        why = (f"it needs {need.required / GIB:.1f} GiB (budget {need.budget / GIB:.1f} GiB with a {margin:.0%} "
               f"margin)" if not need.vram_fits else _host_line(need))
        raise DoesNotFitError(
            f"{shape.name} ({method}, r {rank}, {optim}) does not fit on {where} ({gpu.usable_gib:.1f} GiB per GPU) "
            f"even at seq {SEQ_STEP}, batch {batch_size or 1}: {why}.", sugg)
    if max_seq_length is not None:
        seq = max_seq_length
        if batch_size is None and not _fits(shape, gpu, margin, seq=seq, batch=1, r=rank, **cfg):
            sugg = suggestions(shape, gpu, margin, seq=seq, batch=1, r=rank, **cfg)
            one = estimate(shape, seq=seq, batch=1, r=rank, gpu=gpu, margin=margin, **cfg)
            why = "" if not one.vram_fits else f": {_host_line(one)}"
            raise DoesNotFitError(f"{shape.name} ({method}, r {rank}) does not fit on {gpu.name} at seq {seq} "
                                  f"even with batch 1{why}.", sugg)
    else:
        seq = min(DEFAULT_SEQ, longest) if batch_size is None else longest
    batch = batch_size or largest_batch(shape, gpu, margin, seq=seq, limit=target_batch, r=rank, **cfg)
    est = estimate(shape, seq=seq, batch=batch, r=rank, gpu=gpu, margin=margin, **cfg)
    longest_b1 = longest if batch_size in (None, 1) else longest_seq(shape, gpu, margin, batch=1, r=rank, **cfg)
    if est.host_budget is not None:
        _note_host_limit(est, shape, gpu, margin, dict(cfg, r=rank), longest_b1, batch_size, target_batch)
    return Plan(est, _recommendation(est, target_batch, longest_b1), longest_b1, [])


def _note_host_limit(est, shape, gpu, margin, cfg, longest_b1, batch_size, target_batch) -> None:
    """A note on ``est`` when the pinned host RAM, not VRAM, bounds the searched seq or batch."""
    vram_only = dict(cfg, host=None)
    limits = []
    s = longest_seq(shape, gpu, margin, batch=1, **vram_only)
    if longest_b1 and s > longest_b1:
        limits.append(f"seq {s} at batch 1 (not {longest_b1})")
    if batch_size is None:
        b = largest_batch(shape, gpu, margin, seq=est.seq, limit=target_batch, **vram_only)
        if b > est.batch:
            limits.append(f"batch {b} at seq {est.seq} (not {est.batch})")
    if limits:
        est.notes.append(f"pinned host RAM limits this plan ({est.host.describe(est.sharding.gpus)}): VRAM alone "
                         f"would allow {' and '.join(limits)}; more host RAM, or --checkpointing standard (layer "
                         f"inputs kept on the GPU, more VRAM), lifts it")


def _recommendation(est: Estimate, target_batch: int, longest: int | None) -> dict:
    gpus = est.sharding.gpus
    accum = math.ceil(target_batch / (est.batch * gpus))
    return {"max_seq_length": est.seq, "batch_size": est.batch, "grad_accum": accum,
            "r": est.r if est.method != "full" else None, "effective_batch": est.batch * accum * gpus,
            "gpus": gpus, "distributed": est.sharding.mode,
            "longest_seq_at_batch_1": longest, "method": est.method, "optim": est.optim,
            "checkpointing": est.checkpointing, "gpu": est.gpu.name, "vram_gib": round(est.gpu.usable_gib, 2),
            "predicted_peak_gib": round(est.peak_allocated / GIB, 2), "required_gib": round(est.required / GIB, 2),
            "budget_gib": round(est.budget / GIB, 2), "margin": est.margin,
            "host_pinned_gib": round(est.host_pinned_total / GIB, 2),
            "host_budget_gib": None if est.host_budget is None else round(est.host_budget / GIB, 2),
            "host_ram_source": None if est.host is None else est.host.source}


def recommend(model, method: str = "lora", gpu=None, *, max_seq_length: int | None = None,
              batch_size: int | None = None, r: int | None = None, optim: str = "adamw",
              checkpointing: str = "corept", target_batch: int = 16, margin: float = DEFAULT_MARGIN,
              vram: float | None = None, trust_remote_code: bool = False, gpus: int = 1,
              distributed: str | None = None, host_ram: float | HostMemory | None = None) -> dict:
    """The training profile for ``corept train --profile auto``.

    :param model: name/path (config only is read), a ``PretrainedConfig`` or a config dict.
    :param method: ``"lora"``, ``"qlora"`` or ``"full"``.
    :param gpu: a profile name (``"rtx3090"``...), a :class:`GpuProfile`, or ``None`` for the
        detected CUDA device.
    :param max_seq_length, batch_size, r: pin any of them; the others are searched.
    :param host_ram: GiB of RAM of the training machine; ``None``: this one's (see :func:`plan`).
    :returns: ``{"max_seq_length", "batch_size", "grad_accum", "r", ...}`` (see :func:`plan`).
    :raises DoesNotFitError: nothing fits; the message names the smallest change that would.
    """
    p = plan(model, method, gpu=gpu, vram=vram, max_seq_length=max_seq_length, batch_size=batch_size, r=r,
             optim=optim, checkpointing=checkpointing, target_batch=target_batch, margin=margin,
             trust_remote_code=trust_remote_code, gpus=gpus, distributed=distributed, host_ram=host_ram)
    if not p.fits:
        e = p.estimate
        why = (f"needs {e.required / GIB:.1f} GiB; {e.gpu.name} has a budget of {e.budget / GIB:.1f} GiB"
               if not e.vram_fits else f"does not fit in host RAM: {_host_line(e)}")
        raise DoesNotFitError(f"{e.model.name} ({method}) at seq {e.seq}, batch {e.batch} {why}.", p.suggestions)
    return p.recommendation
