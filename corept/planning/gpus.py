"""GPU profiles the planner knows: usable memory, bf16 and FlashAttention support.

``usable_gib`` is what ``torch.cuda.get_device_properties(0).total_memory`` reports for the card
(a little under the marketing size: ECC and the driver's reservation are already gone), so a plan
made for a profile matches a plan made for the detected card of that kind. The CUDA context
(``context_gib``) lives inside that memory but outside the caching allocator's counters, so the
planner adds it on top of the predicted ``max_memory_allocated``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from corept.errors import InvalidOptionsError

GIB = 2**30


@dataclass(frozen=True)
class GpuProfile:
    """One GPU model.

    :param name: CLI name, e.g. ``"rtx3090"``.
    :param label: the device name as ``torch.cuda.get_device_name`` reports it (a product name;
        every memory size the planner prints is in GiB, never the marketing GB).
    :param usable_gib: total device memory as torch reports it, in GiB.
    :param bf16: bf16 supported (else the planner assumes fp16 activations).
    :param flash: SDPA can use a FlashAttention kernel (sm80+); without it a GQA model's
        attention falls back to the O(S^2) math path, which the planner models approximately.
    :param context_gib: CUDA context + kernel images (outside the allocator's counters).
    """

    name: str
    label: str
    usable_gib: float
    bf16: bool = True
    flash: bool = True
    context_gib: float = 0.5

    @property
    def usable_bytes(self) -> int:
        return int(self.usable_gib * GIB)

    def to_dict(self) -> dict:
        return asdict(self)


GPUS: dict[str, GpuProfile] = {g.name: g for g in (
    GpuProfile("rtx3090", "NVIDIA GeForce RTX 3090", 23.70),
    GpuProfile("rtx4090", "NVIDIA GeForce RTX 4090", 23.65),
    GpuProfile("l4", "NVIDIA L4", 22.05),
    GpuProfile("t4", "Tesla T4", 14.75, bf16=False, flash=False, context_gib=0.4),
    GpuProfile("a100-40", "NVIDIA A100-SXM4-40GB", 39.39),
    GpuProfile("a100-80", "NVIDIA A100-SXM4-80GB", 79.25),
    GpuProfile("h100", "NVIDIA H100 80GB HBM3", 79.19),
    GpuProfile("h200", "NVIDIA H200", 139.80),
)}

_ALIASES = {"3090": "rtx3090", "4090": "rtx4090", "a100": "a100-80", "a100-40gb": "a100-40",
            "a100-80gb": "a100-80", "h100-80": "h100"}


def get_gpu(name: str | GpuProfile | None = None, *, vram_gib: float | None = None) -> GpuProfile:
    """A profile by name (case-insensitive), or a custom one from ``vram_gib``.

    :param name: a key of :data:`GPUS` (``rtx3090``, ``a100-40``, ...), a :class:`GpuProfile`, or
        ``None`` with ``vram_gib`` (or neither: the detected GPU, see :func:`detect_gpu`).
    :param vram_gib: usable memory in GiB; alone it makes a custom bf16 + flash profile, with a
        name it overrides that profile's memory.
    :raises InvalidOptionsError: unknown name (the message lists the known ones), or no GPU
        named and none detected.
    """
    if isinstance(name, GpuProfile):
        gpu = name
    elif name is None and vram_gib is not None:
        gpu = GpuProfile("custom", f"custom GPU ({vram_gib:g} GiB)", float(vram_gib))
    elif name is None:
        gpu = detect_gpu()
    else:
        key = str(name).strip().lower().replace("_", "-")
        key = _ALIASES.get(key, key)
        if key not in GPUS:
            raise InvalidOptionsError(f"unknown GPU {name!r}; known GPUs: {', '.join(GPUS)} "
                                      f"(or pass --vram GIB for any other card).")
        gpu = GPUS[key]
    if vram_gib is not None and gpu.usable_gib != float(vram_gib):
        if vram_gib <= 0:
            raise InvalidOptionsError(f"--vram must be positive, got {vram_gib!r}")
        gpu = GpuProfile(gpu.name, f"{gpu.label}, {vram_gib:g} GiB", float(vram_gib), gpu.bf16, gpu.flash,
                         gpu.context_gib)
    return gpu


def detect_gpu(device: int = 0) -> GpuProfile:
    """The profile of the local CUDA device: its real total memory, bf16 and flash support.

    :raises InvalidOptionsError: no CUDA device (name a GPU instead).
    """
    import torch

    if not torch.cuda.is_available():
        raise InvalidOptionsError(f"no CUDA GPU detected; name one with --gpu ({', '.join(GPUS)}) "
                                  f"or give its memory with --vram GIB.")
    props = torch.cuda.get_device_properties(device)
    major = props.major
    return GpuProfile(f"cuda:{device}", props.name, props.total_memory / GIB, bf16=major >= 8, flash=major >= 8)
