"""This process under ``torchrun`` / ``accelerate launch``: rank, local rank, world size and device.

Launchers describe the process in environment variables (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``); nothing here needs the process group to be initialized. On CUDA each rank owns
GPU ``LOCAL_RANK``: :func:`use_local_device` makes it torch's current device, which Triton kernels
and NCCL launch on (a tensor on ``cuda:1`` while the current device is 0 would be read by a
kernel launched on GPU 0).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Launch:
    """One process of a launched group."""

    rank: int
    local_rank: int
    world_size: int


def launch(env: dict | None = None) -> Launch | None:
    """The launcher's description of this process, or ``None`` when not launched as a group.

    A single process started by ``torchrun --nproc-per-node 1`` (``WORLD_SIZE=1``) counts as
    launched: it still owns ``LOCAL_RANK``'s device.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env or "LOCAL_RANK" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        local = int(env["LOCAL_RANK"])
        rank = int(env.get("RANK", local))
    except ValueError:
        return None
    return Launch(rank=rank, local_rank=local, world_size=world)


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` under a launcher with CUDA, else the current CUDA device, else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    here = launch()
    if here is not None and here.local_rank < torch.cuda.device_count():
        return torch.device("cuda", here.local_rank)
    return torch.device("cuda", torch.cuda.current_device())


def use_local_device() -> int | None:
    """Make this rank's GPU the current CUDA device; returns its index (``None`` without CUDA)."""
    dev = local_device()
    if dev.type != "cuda":
        return None
    if torch.cuda.current_device() != dev.index:
        torch.cuda.set_device(dev.index)
    return dev.index


def is_main_process() -> bool:
    """Rank 0 of the group, or a process started alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    here = launch()
    return here is None or here.rank == 0


def barrier() -> None:
    """Wait for every rank (no-op without an initialized process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def leave_group() -> None:
    """Wait for every rank, then destroy the process group (no-op without one). A rank that exits
    while a peer still writes (rank 0 saving) closes its gloo/NCCL connections under that peer."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_skipping_teardown(code: int | None) -> None:
    """End a worker process whose work is written and whose process group is destroyed, skipping
    the interpreter's teardown (``os._exit``; stdout/stderr flushed first).

    With FSDP2 on gloo (CPU) the teardown intermittently aborts in a C++ destructor ("terminate
    called without an active exception": 2 of 7 dry runs on a 2-core machine) after the work is
    done, turning a finished run into a failed exit status.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
