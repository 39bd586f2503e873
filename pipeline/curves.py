"""Training curves as one TSV per run: a ``step`` column and one column per logged value.

Rewritten atomically after every row, so a crash leaves the curves up to the last logged epoch.
DVC plots read the file directly (``x: step``). Plain text on purpose: no experiment tracker, no
git or network access from inside a stage.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io import atomic_write_bytes

__all__ = ["CurveLog"]


class CurveLog:
    """Callable ``log(step, stats)`` appending one row to ``path``; ``path`` exists from construction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict[str, float]] = []
        self._write()

    def __call__(self, step: int, stats: dict[str, float]) -> None:
        self.rows.append({"step": step, **stats})
        self._write()

    def _write(self) -> None:
        columns = ["step"] + sorted({k for row in self.rows for k in row} - {"step"})
        lines = ["\t".join(columns)]
        for row in self.rows:
            lines.append("\t".join(f"{row[c]:.6g}" if c in row else "" for c in columns))
        atomic_write_bytes(self.path, ("\n".join(lines) + "\n").encode())
