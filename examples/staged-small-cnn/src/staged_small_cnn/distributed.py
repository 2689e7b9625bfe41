"""Data-parallel training under torchrun: one process per device, one code path.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. Without them this is a single
process, and every helper here does nothing, so `fit` reads the same either way.
Under torchrun even one process joins a process group and trains through DDP,
so `torchrun --nproc_per_node=1` tries the multi-GPU path on one GPU.
The rules that keep freezing and DDP apart:

- freeze and fix BatchNorm *before* wrapping: DDP registers only parameters
  that require grad when it is built, so frozen ones never enter its buckets;
- after an unfreeze, build a new wrapper: the old one would never all-reduce
  the gradients of parameters that were frozen when it was made, and the ranks
  would silently drift apart;
- only rank 0 writes files and prints; every rank reads the same checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    distributed: bool = False  # started by torchrun, in a process group

    @property
    def main(self) -> bool:
        """The one process that writes files and prints."""
        return self.rank == 0


SINGLE = World()


def start(dev: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU), if any.

    `dev` is --device as run.pick_device checked it. Joining twice in one
    process is harmless: the group is kept until stop().
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return SINGLE, dev
    if dev.index is not None:
        raise ConfigError(f"--device {dev}: under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda")
    if dev.type == "cuda":
        local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= gpus:
            raise ConfigError(
                f"torchrun started more processes on this machine than it has GPUs ({gpus}): "
                f"pass --nproc_per_node={gpus}, or --device cpu for gloo processes"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), distributed=True), dev


def stop(wait: bool = True) -> None:
    """Leave the process group, if this process joined one.

    `wait` first meets every rank at a barrier, so none tears its connections
    down while another still uses them (a rank that left early has aborted
    gloo's teardown here). After an error there is no waiting: the other
    ranks may never arrive.
    """
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, dev: torch.device) -> nn.Module:
    """The module the training step calls: `model` itself, or a DDP wrapper around it.

    Every trainable parameter takes part in each step (frozen ones are not
    registered at all), so find_unused_parameters stays off and costs nothing.
    """
    if not world.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def all_sum(values: list[float], world: World, dev: torch.device) -> list[float]:
    """Sum `values` over all ranks (loss sums, correct counts, sample counts)."""
    if not world.distributed:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(total)
    return total.tolist()


def gather(obj: object, world: World) -> list[object]:
    """`obj` from every rank, in rank order (each rank's RNG state for a checkpoint)."""
    if not world.distributed:
        return [obj]
    objects: list[object] = [None] * world.size
    dist.all_gather_object(objects, obj)
    return objects


def on_main(compute: Callable[[], T], world: World) -> T:
    """Run `compute` on rank 0 alone and give every rank its result, or its error.

    For work that must happen once: choosing a checkpoint to resume reads and
    hashes files and prints what it skipped; a stage's restore_best finds
    the best file once rank 0 has written it. An error is raised on every
    rank, so none waits for a broadcast that never comes.
    """
    if not world.distributed:
        return compute()
    payload: list[object] = [None]
    if world.main:
        try:
            payload = [(True, compute())]
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            payload = [(False, err)]
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if not ok:
        raise value
    return value


def sync_buffers(model: nn.Module, world: World) -> None:
    """Give every rank rank 0's buffers.

    DDP broadcasts buffers at the start of each forward, so after the last
    step of an epoch the BN running statistics of trainable BN differ between
    ranks; evaluation and checkpoints must all see rank 0's.
    """
    if world.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def check_in_sync(model: nn.Module, world: World) -> None:
    """Raise if any parameter or buffer differs between ranks.

    Cheap (one sum per tensor, one all-reduce) and run every epoch: a rank
    that drifts means gradients were not all-reduced, which must never pass
    silently.
    """
    if not world.distributed:
        return
    named = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_floating_point()]
    sums = torch.stack([t.detach().double().sum() for _, t in named])
    high, low = sums.clone(), sums.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    drifted = [name for (name, _), hi, lo in zip(named, high.tolist(), low.tolist(), strict=True) if hi != lo]
    if drifted:
        raise RuntimeError(f"ranks hold different values for {len(drifted)} tensors, first {drifted[:3]}")
