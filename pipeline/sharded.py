"""Per-shard work split across ``torchrun`` ranks, written into one output directory atomically.

Each job (typically one input shard) writes its own output file(s), so the result does not depend on
the number of processes. All ranks write into one temporary sibling of the output directory; after
a barrier rank 0 writes the index and renames the directory into place. A failure leaves the
previous output untouched; a full disk or quota met while writing raises ``OutOfSpaceError``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from tqdm import tqdm

from pipeline import distributed as D
from pipeline.io import out_of_space

__all__ = ["run_sharded"]

J = TypeVar("J")


def run_sharded(
    out_dir: str | Path,
    jobs: Sequence[J],
    work: Callable[[J, Path, tqdm], None],
    finalize: Callable[[Path], dict],
    sizes: Sequence[int],
    desc: str,
) -> dict:
    """Run ``work(job, tmp_dir, bar)`` for this rank's jobs (every world-th one), then on rank 0
    ``finalize(tmp_dir) -> result`` and the atomic rename. Returns ``result`` on rank 0, ``{}`` elsewhere.
    ``sizes`` are the jobs' item counts for the progress bar (shown on rank 0 only).
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")  # the same path on every rank
    if D.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    mine = list(range(D.rank(), len(jobs), D.world_size()))
    bar = tqdm(total=sum(sizes[i] for i in mine), desc=desc, unit="img", disable=not D.is_main(), mininterval=1.0)
    try:
        for i in mine:
            work(jobs[i], tmp, bar)
        bar.close()
        D.barrier()
        result: dict = {}
        if D.is_main():
            result = finalize(tmp)
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if out_dir.exists():
                out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        D.barrier()
        return result
    except BaseException as exc:
        if D.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise out_of_space(exc, out_dir) or exc  # a full disk or quota: the clear error (after the cleanup)
    finally:
        D.cleanup()
