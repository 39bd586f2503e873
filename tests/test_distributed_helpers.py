"""pipeline.distributed's collectives on a real two-process gloo group, and the backend -> device rule
that puts tensors where NCCL (CUDA only) or gloo (CPU) need them."""

from __future__ import annotations

import multiprocessing as mp
import traceback

import pytest
import torch

from pipeline import distributed as D


def _ranks(tmp_path, rank: int) -> None:
    """One rank: run the helpers and save what they returned (or the traceback) for the parent to check."""
    import torch.distributed as dist  # the test sets the group up; the library joins through init_distributed

    torch.set_num_threads(1)
    out: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=rank, world_size=2)
        t = torch.full((2, 3), float(rank + 1))
        s = D.sum_over_ranks(t)
        out["sum"], out["sum_device"], out["sum_is_input"] = s, str(s.device), s is t
        out["input_after_sum"] = t.clone()
        out["mean"] = D.mean_over_ranks(torch.tensor([rank * 4.0]))
        out["sum_int"] = D.sum_over_ranks(torch.tensor(rank + 5, dtype=torch.int64))
        # broadcast receives into the caller's tensor, also a non-contiguous one (a copy is staged and copied back)
        buf = torch.arange(6, dtype=torch.int64).reshape(2, 3) * 10 if rank == 1 else torch.zeros(2, 3, dtype=torch.int64)
        ret = D.broadcast(buf, 1)
        out["bcast"], out["bcast_same_object"], out["bcast_device"] = buf.clone(), ret is buf, str(buf.device)
        base = torch.arange(12.0).reshape(3, 4) if rank == 0 else torch.full((3, 4), -1.0)
        view = base.t()  # non-contiguous
        D.broadcast(view, 0)
        out["bcast_view"] = base.clone()
        D.barrier()
        dist.destroy_process_group()
    except BaseException:
        out["error"] = traceback.format_exc()
    torch.save(out, tmp_path / f"rank{rank}.pt")


def test_broadcast_and_sum_over_two_gloo_processes(tmp_path):
    # fork: the children have torch imported already (a spawned child spends seconds importing it again)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_ranks, args=(tmp_path, r)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    for p in procs:
        if p.is_alive():
            p.kill()
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r, out in enumerate(res):
        assert "error" not in out, f"rank {r}:\n{out['error']}"
        assert torch.equal(out["sum"], torch.full((2, 3), 3.0)) and out["sum_device"] == "cpu"
        assert not out["sum_is_input"] and torch.equal(out["input_after_sum"], torch.full((2, 3), float(r + 1)))
        assert torch.equal(out["mean"], torch.tensor([2.0]))
        assert out["sum_int"].dtype == torch.int64 and int(out["sum_int"]) == 11
        assert torch.equal(out["bcast"], torch.arange(6).reshape(2, 3) * 10) and out["bcast"].dtype == torch.int64
        assert out["bcast_same_object"] and out["bcast_device"] == "cpu"
        assert torch.equal(out["bcast_view"], torch.arange(12.0).reshape(3, 4))
    assert all(p.exitcode == 0 for p in procs)


def test_single_process_helpers_are_identities():
    t = torch.ones(3)
    assert D.sum_over_ranks(t) is t and D.mean_over_ranks(t) is t and D.broadcast(t, 0) is t
    D.barrier()


@pytest.mark.parametrize("backend, current, expected", [
    ("nccl", "cpu", "cuda"),
    ("NCCL", "cpu", "cuda"),
    ("nccl", "cuda:1", "cuda:1"),  # already on a CUDA device: stays there
    ("gloo", "cpu", "cpu"),
    ("gloo", "cuda:0", "cpu"),
    ("mpi", "cuda:0", "cpu"),
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ("cpu:gloo,cuda:nccl", "cuda:0", "cuda:0"),
    ("cuda:nccl", "cpu", "cuda"),
    ("some_plugin", "cpu", "cpu"),  # an unknown backend: left where it is
])  # fmt: skip
def test_collective_device_follows_the_backend(backend, current, expected):
    assert D.collective_device(backend, torch.device(current)) == torch.device(expected)
