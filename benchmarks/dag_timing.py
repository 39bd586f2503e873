"""Wall time of every stage of a clean `dvc repro` of the embedded default; prints JSON.

    python benchmarks/dag_timing.py [--keep DIR] [--cache DIR]

Copies the repository's tracked and untracked files (not data/, metrics/, plots/, reports/ or
dvc.lock) into a fresh git repository in a temporary directory, runs `dvc repro` there and times
each stage from DVC's own "Running stage" lines, with the copy's own code first on PYTHONPATH. The
same command, run twice, must run nothing the second time: that is reported too. ``--cache DIR``
shares a DVC cache (and run-cache), e.g. ``.dvc/cache`` of this checkout, so that a `dvc repro` here
afterwards restores every stage instead of rerunning it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = ("data/", "metrics/", "plots/", "reports/")


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(SKIP) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.email=bench@example.com", "-c", "user.name=bench"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)


def timed_repro(repo: Path, env: dict) -> tuple[dict[str, float], float, int]:
    stages: dict[str, float] = {}
    current, started = None, time.perf_counter()
    t0 = started
    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)  # fmt: skip
    for line in proc.stdout:
        m = re.match(r"Running stage '([^']+)'", line)
        if m:
            now = time.perf_counter()
            if current is not None:
                stages[current] = round(now - started, 1)
            current, started = m.group(1), now
    rc = proc.wait()
    end = time.perf_counter()
    if current is not None:
        stages[current] = round(end - started, 1)
    return stages, round(end - t0, 1), rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="run in this (new) directory and keep it")
    ap.add_argument("--cache", type=Path, help="use this DVC cache directory (shared run-cache)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="semmae-dag-"))
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": str(work)}  # the copy's code, not an editable install's
    try:
        copy_repo(work)
        if args.cache is not None:
            subprocess.run(["dvc", "cache", "dir", "--local", str(args.cache.resolve())], cwd=work, env=env, check=True)
        stages, total, rc = timed_repro(work, env)
        again, _, rc2 = timed_repro(work, env)
        print(json.dumps({"cpu_count": os.cpu_count(), "total_seconds": total, "returncode": rc, "stages": stages,
                          "second_repro_ran": sorted(again), "second_returncode": rc2}, indent=2))  # fmt: skip
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
