"""torch.distributed plumbing: one process per device, DDP for gradients, all-reduce for statistics.

A process joins a group when the launcher (torchrun or `ntkcl train --gpus/--nproc`) has set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; otherwise it runs alone with world size 1 and every
collective below is a no-op. NCCL is used on GPUs and gloo on CPU (which is how the tests run it).

Every collective of the group times out (`NTKCL_DIST_TIMEOUT` seconds, default 1800) instead of waiting
forever for a process that died, so a failure on one rank cannot leave the others hanging.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "NTKCL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


def group_timeout() -> timedelta:
    """How long a collective may wait for the other ranks before it fails."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = DEFAULT_TIMEOUT_S
    return timedelta(seconds=max(seconds, 1.0))


def launched_by_torchrun() -> bool:
    """Whether this process is a rank of a group that an outside launcher (torchrun, srun wrappers) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


@dataclass
class DistributedContext:
    """Rank, world size and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, value):
        """Rank 0's `value` on every rank."""
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def pick_device(requested: str, local_rank: int = 0, gpus: list[int] | None = None) -> torch.device:
    """`auto` is the GPU for this process when CUDA is available, else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if requested.startswith("cuda:"):
        return torch.device(requested)
    index = gpus[local_rank] if gpus else local_rank
    return torch.device("cuda", index)


def init_distributed(requested_device: str = "auto", gpus: list[int] | None = None) -> DistributedContext:
    """Join the process group described by the environment, or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank, gpus)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=group_timeout())
    return DistributedContext(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
