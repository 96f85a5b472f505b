"""Data-parallel training under ``torchrun``: one process per device, DistributedDataParallel.

``torchrun`` (``python -m torch.distributed.run``) sets RANK, WORLD_SIZE and LOCAL_RANK; without them the
run is a single process and nothing here touches torch.distributed. The backend is nccl on CUDA and gloo
on the CPU. Every rank reads its own slice of each global batch (``esrdf.data.StepBatchSampler``); only
rank 0 writes checkpoints and draws the progress bar. All ranks read the same checkpoint on resume, so
``--out`` must be on a filesystem they share.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """``None``/"auto": this rank's CUDA device when there is one, else the CPU."""
    if requested in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@contextmanager
def distributed_context(device: str | None = None) -> Iterator[DistContext]:
    """Join the torchrun process group when launched by torchrun (and leave it afterwards)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = pick_device(device, local_rank)
    if world_size == 1:
        yield DistContext(device=target)
        return
    if target.type == "cuda":
        torch.cuda.set_device(target)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    try:
        yield DistContext(dist.get_rank(), dist.get_world_size(), local_rank, target)
    finally:
        if owns_group:
            dist.destroy_process_group()


def wrap_data_parallel(
    module: nn.Module, ctx: DistContext, find_unused_parameters: bool = False
) -> nn.Module:
    """DDP around ``module`` when distributed; DDP broadcasts rank 0's weights, so all ranks start equal."""
    if not ctx.is_distributed:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is true on any: ranks must stop at the same step, or the others
    would wait forever in the next gradient all-reduce."""
    if not ctx.is_distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def sync_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts them before each
    forward, but the last forward leaves each rank with statistics of its own shard."""
    if ctx.is_distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()
