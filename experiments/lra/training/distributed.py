"""torchrun-aware process setup: one process per device, gloo on CPU, nccl on GPUs."""

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ProcessContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_process(device: str = "auto") -> ProcessContext:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain `python -m` run is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda":
        target = torch.device("cuda", local_rank if target.index is None else target.index)
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return ProcessContext(rank, world_size, target)


def all_reduce_sum(tensor: torch.Tensor, context: ProcessContext) -> torch.Tensor:
    if context.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(value, context: ProcessContext) -> list:
    if context.world_size == 1:
        return [value]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(context: ProcessContext) -> None:
    if context.world_size > 1:
        dist.barrier()


def teardown_process() -> None:
    if dist.is_initialized():
        # Leave together, and free the DDP reducer's pending work objects while the interpreter
        # is whole: gloo threads that release them during interpreter shutdown abort the process
        # ("terminate called without an active exception", pytorch/pytorch#179291).
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
