"""Distributed set-up for ``torchrun``: NCCL on GPUs, gloo on CPUs; rank 0 logs and saves."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); else single process.

    ``device`` comes from :func:`dinokit.device.resolve_device` (which already picked this
    process's ``LOCAL_RANK`` GPU): NCCL on GPUs, gloo on CPUs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, world, local_rank, device)


def close_distributed() -> None:
    """Leave the process group together: a barrier first, so no process tears down its
    connections while another still uses them (gloo then aborts at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process if it is true on any: a signal that reached one process stops all.

    Without this a process that stops alone leaves the others waiting in their next collective.
    """
    if not dist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
