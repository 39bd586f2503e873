"""Atomic file and directory output: nothing is ever left half-written under a final name."""

from __future__ import annotations

import errno
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
           "ensure_free_space", "OutOfSpaceError", "out_of_space", "remove_stale_temporaries"]

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
    """Write ``data`` to a temporary sibling, fsync it, then rename it over ``path``. A full disk (or quota)
    raises :class:`OutOfSpaceError`; ``path`` keeps its old content and no temporary is left."""
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
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # first: the message reports the space this frees
        raise out_of_space(exc, path) or exc
    finally:
        tmp.unlink(missing_ok=True)


class OutOfSpaceError(PipelineError, OSError):
    """The disk cannot hold an output: raised before writing when the estimate does not fit, or when a write
    hits a full disk or quota (then the partial output has been removed)."""


_FULL = (errno.ENOSPC, errno.EDQUOT)  # "No space left on device", "Disk quota exceeded"
_GIB = 1 << 30
_WHAT_TO_DO = "free some space (e.g. `dvc gc`), point the output elsewhere, or shrink it"


def _existing(path: Path) -> Path:
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    return probe


def out_of_space(exc: BaseException, path: str | Path) -> OutOfSpaceError | None:
    """The clear error for ``exc`` when it is a full disk or quota (errno ENOSPC / EDQUOT) met while writing
    ``path``, else None. Call it after removing the partial output, so the free space it reports is real."""
    if isinstance(exc, OutOfSpaceError) or not isinstance(exc, OSError) or exc.errno not in _FULL:
        return None
    probe = _existing(Path(path))
    free = shutil.disk_usage(probe).free
    return OutOfSpaceError(
        f"{path}: the disk filled up while writing it ({os.strerror(exc.errno)}); nothing was written (the partial "
        f"output was removed) and {probe} has {free / _GIB:.2f} GiB free: {_WHAT_TO_DO}"
    )


def ensure_free_space(path: str | Path, needed: int, what: str, files: int = 0) -> int:
    """Fail with a clear message, before writing, if the filesystem of ``path`` has less than ``needed``
    bytes, plus one filesystem block for each of ``files`` files and directories (the unused end of its
    last block), plus a margin, free. ``what`` names the output and the parameter that sizes it. Returns
    the bytes required without the margin (the upper bound of the output's disk usage)."""
    probe = _existing(Path(path))
    needed += files * (os.statvfs(probe).f_frsize or 4096)
    free = shutil.disk_usage(probe).free
    if free < needed + SPACE_MARGIN:
        raise OutOfSpaceError(
            f"{path}: {what} needs about {needed / _GIB:.2f} GiB but {probe} has {free / _GIB:.2f} GiB free: "
            f"{_WHAT_TO_DO}"
        )
    return needed


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


@contextmanager
def atomic_output_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only if the block succeeds.

    On any exception the temporary directory is removed and an existing ``path`` is left untouched,
    so a failed run never leaves a partial output that looks complete; a full disk or quota (ENOSPC /
    EDQUOT) met in the block becomes :class:`OutOfSpaceError`.
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
    except OSError as exc:  # a full disk met by any writer in the block: the clear error, after the cleanup
        _restore(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise out_of_space(exc, path) or exc
    finally:
        _restore(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _restore(old: Path, path: Path) -> None:
    """Put the previous output back when the swap failed between its two renames."""
    if old.exists() and not path.exists():
        os.replace(old, path)
