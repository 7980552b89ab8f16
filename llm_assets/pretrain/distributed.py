"""Data parallelism: the process group that torchrun describes, and the collectives the loop uses.

`torchrun` (or `python -m torch.distributed.run`) starts one process per device and sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address; a plain `python` start sets none of them and
runs single-process with the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def maybe_init_distributed() -> DistInfo:
    """Join the process group if torchrun started us (NCCL on CUDA, gloo on CPU); else run alone.

    On CUDA each process takes the device of its LOCAL_RANK. Idempotent.
    """
    if "RANK" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist_info()


def dist_info() -> DistInfo:
    """Rank, world size and device of this process (rank 0 of 1 when not distributed)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if not dist.is_initialized():
        return DistInfo(0, 1, local_rank, device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (itself when not distributed).

    SUM then divide: gloo has no AVG reduction.
    """
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (just [obj] when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (`obj` itself when not distributed)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
