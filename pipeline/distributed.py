"""torch.distributed helpers that work unchanged with and without ``torchrun``.

Every collective of the pipeline goes through this module (a test checks that no other module calls
one directly). Each moves its tensor to the device the process group's backend works on (CUDA for
NCCL, the CPU for gloo), runs the collective there and hands the result back on the caller's device
with the caller's dtype, so callers may pass CPU tensors under NCCL and CUDA tensors under gloo.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "rank", "world_size", "is_main", "barrier", "device_for_rank", "collective_device",
           "broadcast", "sum_over_ranks", "mean_over_ranks", "cleanup"]  # fmt: skip

# the device type each built-in backend runs its collectives on
_BACKEND_DEVICE = {"nccl": "cuda", "gloo": "cpu", "mpi": "cpu", "ucc": "cpu", "xccl": "xpu", "hccl": "hpu"}


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


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def collective_device(backend: str, current: torch.device | str = "cpu") -> torch.device:
    """The device a tensor now on ``current`` must be on for a collective of ``backend``.

    ``backend`` is what ``torch.distributed.get_backend()`` returns: a name (``"nccl"`` -> ``cuda``, the
    current CUDA device; ``"gloo"`` -> ``cpu``) or a per-device list such as ``"cpu:gloo,cuda:nccl"``
    (the tensor stays where it is when its device type is served, else it goes to the first one listed).
    An unknown backend leaves the tensor where it is.
    """
    current = torch.device(current)
    name = str(backend).lower()
    if ":" in name:
        served = [pair.partition(":")[0].strip() for pair in name.split(",") if pair.strip()]
        return current if current.type in served or not served else torch.device(served[0])
    kind = _BACKEND_DEVICE.get(name)
    if kind is None or kind == current.type:
        return current
    return torch.device(kind)


def _staged(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when a collective can run on it in place, else a contiguous copy on the backend's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"a collective needs a torch.Tensor, got {type(t).__name__}")
    target = collective_device(dist.get_backend(), t.device)
    if target.type == t.device.type and t.is_contiguous():
        return t
    return t.to(target, copy=True).contiguous()


def barrier() -> None:
    """Wait for every rank (nothing in a single process); under NCCL on this rank's current CUDA device."""
    if not dist.is_initialized():
        return
    if collective_device(dist.get_backend(), "cpu").type == "cuda" and torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    """Overwrite ``t`` in place, on every rank, with rank ``src``'s ``t`` (same shape and dtype on all
    ranks); returns ``t``. ``t`` stays on its device whatever the backend (nothing to do in a single process)."""
    if not dist.is_initialized():
        return t
    work = _staged(t)
    dist.broadcast(work, src)
    if work is not t:
        t.copy_(work)
    return t


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over all ranks, a new tensor on ``t``'s device with ``t``'s dtype
    (``t`` itself in a single process; ``t`` is never modified)."""
    if not dist.is_initialized():
        return t
    work = _staged(t)
    if work is t:
        work = t.clone()
    dist.all_reduce(work)
    return work.to(t.device)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``t`` over all ranks (gloo has no AVG: a sum divided by the ranks)."""
    return sum_over_ranks(t) / world_size() if dist.is_initialized() else t


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
