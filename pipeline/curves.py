"""Training curves as one TSV per run: a ``step`` column and one column per logged value.

Rewritten atomically after every row. A stage logs into a staged file (``staged=True``: the hidden
sibling ``.<name>.tmp-<pid>``) and :meth:`CurveLog.publish` renames it over the real curves only once
the stage has succeeded: a failed run leaves the previous run's curves untouched, and its own rows so
far in the staged file (removed by the next run that publishes). A resumed run does not read that file:
the rows come back from its resume state. DVC plots read the file directly (``x: step``). Plain text on
purpose: no experiment tracker, no git or network access from inside a stage.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.io import atomic_write_bytes, remove_stale_temporaries

__all__ = ["CurveLog"]


class CurveLog:
    """Callable ``log(step, stats)`` appending one row. Unstaged, ``path`` exists from construction and holds
    every row; staged, the rows go to :attr:`live` (from the first row on: a run refused before training
    leaves nothing behind) and reach ``path`` at :meth:`publish`."""

    def __init__(self, path: str | Path, staged: bool = False):
        self.path = Path(path)
        # the name of a temporary of this process (io.py's convention: gitignored, dvcignored, and removed
        # once its writer is dead by remove_stale_temporaries)
        self.live = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}") if staged else self.path
        self.rows: list[dict[str, float]] = []
        if not staged:
            self._write()

    def __call__(self, step: int, stats: dict[str, float]) -> None:
        self.rows.append({"step": step, **stats})
        self._write()

    def publish(self) -> None:
        """Write the rows as ``path`` (one atomic rename): call it when the stage has succeeded."""
        self._write()
        if self.live != self.path:
            os.replace(self.live, self.path)
            remove_stale_temporaries(self.path)  # the staged rows of killed or failed earlier runs

    def _write(self) -> None:
        columns = ["step"] + sorted({k for row in self.rows for k in row} - {"step"})
        lines = ["\t".join(columns)]
        for row in self.rows:
            lines.append("\t".join(f"{row[c]:.6g}" if c in row else "" for c in columns))
        atomic_write_bytes(self.live, ("\n".join(lines) + "\n").encode())
