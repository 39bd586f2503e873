"""Which process renamed what: a ``sitecustomize`` that records every ``os.rename``/``os.replace`` (the last
step of each atomic write, pipeline/io.py) of every Python process started with :func:`audit_env`, with
the process's torchrun ``RANK``. Tests use it to show that rank 0 alone put a stage's outputs in place."""

from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = """import os, sys

def _hook(event, args):
    if event == "os.rename":  # os.rename and os.replace
        with open(os.environ["SEMMAE_TEST_RENAMES"], "a") as f:
            f.write(f"{os.environ.get('RANK', '-')}\\t{os.fsdecode(args[0])}\\t{os.fsdecode(args[1])}\\n")

sys.addaudithook(_hook)
"""


def audit_env(root: Path) -> tuple[dict, Path]:
    """``(environment additions, log path)``: processes started with them append ``rank<TAB>src<TAB>dst``
    lines to the log for every rename they make."""
    site = root / "rename_audit"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = root / "renames.tsv"
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))  # keep the caller's (a worktree's)
    return {"PYTHONPATH": path, "SEMMAE_TEST_RENAMES": str(log)}, log


def renames_onto(log: Path, *names: str) -> list[tuple[str, str]]:
    """``(rank, destination)`` of every rename in ``log`` whose destination is one of ``names``, sorted."""
    rows = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
    return sorted((rank, dst) for rank, _, dst in rows if dst in names)
