"""Multi-GPU training: where this process sits under a launcher, FSDP2 sharding, gathered saving.

corept's patches act on module instances, so they compose with PyTorch's own engines: DDP and
FSDP2 (``torch.distributed.fsdp.fully_shard``), directly or through ``accelerate``/the HF Trainer.
Nothing here starts processes: ``torchrun`` or ``accelerate launch`` does (docs/distributed.md).
"""
from corept.distributed.launcher import (Launch, barrier, is_main_process, launch, local_device,
                                         use_local_device)

__all__ = ["Launch", "launch", "local_device", "use_local_device", "is_main_process", "barrier"]
