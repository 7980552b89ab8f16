"""Data parallelism: the process group that torchrun describes, and the collectives the loop uses.

`torchrun` (or `python -m torch.distributed.run`) starts one process per device and sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address; a plain `python` start sets none of them and
runs single-process with the same code.

Two ways to spread one model over the ranks (the recipe's `parallelism`): DDP keeps a full replica
of weights, gradients and optimizer state on every rank; FSDP2 (`fully_shard`) keeps 1/world_size
of each and all-gathers a layer's weights only for its forward and backward. Checkpoints and
exports hold the full, unsharded state either way, so a run may resume under the other one or in
a single process.
"""

from __future__ import annotations

import argparse
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import PreTrainedModel

from llm_assets.worker import end_with_torchrun

S = TypeVar("S")


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


def shard_model(model: PreTrainedModel) -> None:
    """Shard `model` in place with FSDP2 over all ranks: one group per decoder layer (the classes
    transformers names in `_no_split_modules`), then the root group, which holds the rest (the
    embeddings, the final norm and the LM head, tied or not).

    Parameters become DTensors: build the optimizer after this call.
    """
    blocks = set(model._no_split_modules or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ValueError(f"parallelism fsdp: {type(model).__name__} names no decoder layer class in "
                         f"_no_split_modules; use parallelism ddp for this model")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


# Gathered onto rank 0's CPU: the full state never has to fit on one device.
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model(model: PreTrainedModel) -> PreTrainedModel | None:
    """An unsharded copy of an FSDP `model` on rank 0's CPU (None on the other ranks); any other
    model is returned as it is. A collective under FSDP: every rank calls it.

    The copy is built on the meta device and takes the gathered tensors as its parameters, so it
    costs no memory beyond them; a tied LM head is tied again. It is for saving (its state dict
    is complete); buffers outside the state dict, such as rotary frequencies, stay on meta.
    """
    if not is_sharded(model):
        return model
    state = get_model_state_dict(model, options=_FULL_ON_RANK0)
    if not dist.get_rank() == 0:
        return None
    # fully_shard swapped the class for a subclass of (FSDPModule, original class).
    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = plain_class(model.config)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    return plain


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The optimizer state of an FSDP `model`, unsharded onto rank 0's CPU (None on the other ranks)
    and keyed like `optimizer.state_dict()` of the unsharded model: by parameter index. A collective.
    """
    state = get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK0)
    if not dist.get_rank() == 0:
        return None
    # The FQN-keyed form lists each group's parameters in the optimizer's order; their positions
    # over all groups are the indices the plain form uses.
    index = {name: i for i, name in enumerate(n for group in state["param_groups"] for n in group["params"])}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [group | {"params": [index[n] for n in group["params"]]} for group in state["param_groups"]],
    }


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """Load a full, index-keyed optimizer state (every rank holds it) into the optimizer of the
    sharded `model`, each rank keeping its shard. The indices follow `optimizer`'s parameter order,
    which is the unsharded optimizer's when both were built by the same function."""
    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {ordered[i]: value for i, value in state["state"].items()},
        "param_groups": [group | {"params": [ordered[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def worker_main(prog: str, description: str, parse_spec: Callable[[str], S], run: Callable[[S], None]) -> None:
    """A training worker's command line (`prog --spec run.json`), as torchrun starts it on each
    rank: the rank ends with torchrun's agent, and its process group is torn down however `run`
    ends."""
    end_with_torchrun()
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True, help="JSON run spec")
    spec = parse_spec(parser.parse_args().spec.read_text())
    try:
        run(spec)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # The rank has reported (or failed) and left its process group: spare its exit the
        # interpreter's last full garbage collection over the 600,000-700,000 objects of torch,
        # transformers and trl, 4-5 s per rank on two busy cores that the launching step waits for.
        gc.freeze()
