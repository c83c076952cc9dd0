"""Thin helpers over torch.distributed that are no-ops in a single process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes (in place and returned); identity in a single process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def init_from_env() -> torch.device | None:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Returns the device of this rank (``cuda:LOCAL_RANK`` with NCCL on GPU, CPU with gloo), or None when not
    launched by torchrun.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if is_distributed():  # already initialised (one process runs several trainings, as compare does)
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(n: int) -> range:
    """The indices of ``n`` evaluation cases this process handles (round robin over ranks)."""
    return range(rank(), n, world_size())


def gather_objects(items: list) -> list:
    """Concatenate the per-rank lists ``items`` on every rank (rank order); identity in a single process.

    Evaluation uses it to gather per-case results (which carry their case IDs) from all ranks.
    """
    if not is_distributed():
        return list(items)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
