"""Resume checkpoints for long trainings: the last two good states, tied to the run's config.

A training stage keeps ``<dir>/last.pth`` and ``<dir>/prev.pth`` (a directory DVC does not manage,
so ``dvc repro`` leaves it alone before rerunning a killed stage). Each save writes a temporary file
and renames it; the previous ``last`` becomes ``prev``. Loading tries the newest first (a complete
``.next.pth`` left by a kill between the two renames, then ``last``, then ``prev``): a file that is
truncated or unreadable is skipped with a warning, and a state written under a different
config (``fingerprint``) is ignored, so a changed parameter never resumes a stale run; once the
run's outputs are written the states are cleared (:meth:`ResumeStore.clear`).
States are plain dicts of tensors and Python values, read with ``torch.load(weights_only=True)``.

One run at a time per directory: a stage holds :func:`exclusive_run` (``fcntl.flock`` on ``<dir>/.lock``)
for its whole run, and a second run on the same directory is refused at once, naming the holder's pid
(two runs would rename each other's states away and resume each other's epochs). The kernel drops the
lock when its holder dies, so a killed run never blocks the rerun.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_write_bytes

__all__ = ["ResumeStore", "fingerprint", "exclusive_run", "ResumeBusyError", "LOCK_NAME"]

LOCK_NAME = ".lock"

log = logging.getLogger(__name__)


def fingerprint(*parts: bytes | str) -> str:
    """sha256 over the given config/input identities."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


class ResumeBusyError(PipelineError):
    """Another live run holds the resume directory."""


@contextmanager
def exclusive_run(directory: str | Path, stage: str) -> Iterator[None]:
    """Hold ``directory`` (created if missing) for one run of ``stage``; refuse at once, without waiting, if
    another process holds it. The lock file is removed on release, so a finished run leaves the directory
    as :meth:`ResumeStore.clear` left it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = _holder(path)
            raise ResumeBusyError(
                f"{directory} is in use by another run ({f'pid {holder}' if holder else 'pid unknown'}, its lock "
                f"{path}): two runs of `semmae {stage}` on one resume directory would overwrite each other's "
                f"checkpoints. Wait for that run to finish or stop it{f' (kill {holder})' if holder else ''}, or "
                "give this run another --resume directory"
            ) from None
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiting opener re-checks the inode above
        os.close(fd)


def _holder(path: Path, wait: float = 1.0) -> Optional[int]:
    """The pid the lock's holder wrote; it writes it just after locking, so wait up to ``wait`` seconds for it
    (None if it never appears)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit() or time.monotonic() > deadline:
            return int(text) if text.isdigit() else None
        time.sleep(0.01)


class ResumeStore:
    def __init__(self, directory: str | Path, fingerprint: str) -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint

    @property
    def last(self) -> Path:
        return self.dir / "last.pth"

    @property
    def prev(self) -> Path:
        return self.dir / "prev.pth"

    @property
    def next(self) -> Path:
        """The state being installed: written atomically, so complete whenever it exists."""
        return self.dir / ".next.pth"

    def save(self, state: dict) -> None:
        """Write ``state`` (plus the fingerprint) as the new ``last``; the old ``last`` becomes ``prev``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({**state, "fingerprint": self.fingerprint}, buf)
        atomic_write_bytes(self.next, buf.getvalue())
        if self.last.exists():
            os.replace(self.last, self.prev)
        os.replace(self.next, self.last)

    def clear(self) -> None:
        """Forget the states once the run's final outputs are written: a later rerun (e.g. after a code
        change) trains from scratch instead of "resuming" a finished run. The directory itself stays."""
        for path in (self.last, self.prev, self.next):
            path.unlink(missing_ok=True)

    def load(self) -> Optional[dict]:
        """The newest readable state written under this fingerprint, or ``None`` (start fresh)."""
        for path in (self.next, self.last, self.prev):
            if not path.is_file():
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # truncated or corrupt: fall back to the older state
                log.warning("resume checkpoint %s is unreadable (%s: %s); trying the previous one",
                            path, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
                continue
            if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
                log.info("resume checkpoint %s belongs to another config or input; not resuming from it", path)
                continue
            log.info("resuming from %s (epoch %s)", path, state.get("epoch"))
            return state
        return None
