"""Minimal torch.distributed helpers: works unchanged with and without ``torchrun``."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "rank", "world_size", "is_main", "barrier", "device_for_rank", "sum_over_ranks", "mean_over_ranks", "cleanup"]


def init_distributed() -> None:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); nccl on CUDA, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over all ranks (``t`` itself in a single process)."""
    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``t`` over all ranks (gloo has no AVG: a sum divided by the ranks)."""
    return sum_over_ranks(t) / world_size() if dist.is_initialized() else t


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
