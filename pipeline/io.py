"""Atomic file and directory output: nothing is ever left half-written under a final name."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import PipelineError

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_output_dir", "json_bytes", "file_sha256",
           "ensure_free_space", "OutOfSpaceError", "remove_stale_temporaries"]

SPACE_MARGIN = 64 << 20  # bytes kept free beyond the estimate (filesystem metadata, logs)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_bytes(obj: Any) -> bytes:
    """Deterministic, human-readable JSON (sorted keys, trailing newline)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete the ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` siblings of ``path`` left by a killed
    writer (its pid no longer runs): a SIGKILL cannot run cleanup code, and at ImageNet scale an
    orphaned temporary shard directory is tens of GB."""
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
        kind, _, pid = sibling.name[len(path.name) + 2 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if sibling.is_dir():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class OutOfSpaceError(PipelineError, OSError):
    """The disk cannot hold the next output; raised before anything is written."""


def ensure_free_space(path: str | Path, needed: int, what: str) -> None:
    """Fail with a clear message, before writing, if the filesystem of ``path`` has less than ``needed``
    bytes (+ a margin) free. ``what`` names the output and the parameter that sizes it."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + SPACE_MARGIN:
        gib = 1 << 30
        raise OutOfSpaceError(
            f"{path}: {what} needs about {needed / gib:.2f} GiB but {probe} has {free / gib:.2f} GiB free: free some "
            "space (e.g. `dvc gc`), point the output elsewhere, or shrink it"
        )


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


@contextmanager
def atomic_output_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only if the block succeeds.

    On any exception the temporary directory is removed and an existing ``path`` is left untouched,
    so a failed run never leaves a partial output that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
