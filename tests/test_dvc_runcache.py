"""Why the stages' metrics are cached outputs and only the report's are `cache: false` (docs/sharing.md).

DVC pushes only cached outputs. A `cache: false` metrics file is in git but never in the remote, so on another
machine DVC's run-cache cannot restore its stage after a reverted parameter: the stage reruns. A cached metrics
file is pushed, and the stage is restored. On the machine that ran the stage, both restore. A `cache: false`
plain output (not a metric or plot) keeps the stage out of the run-cache everywhere. Shown on a one-line stage
with a local-directory remote (seconds), so a DVC upgrade that changes this is noticed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # DVC end to end

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
MAKE = """import json, yaml
a = yaml.safe_load(open("params.yaml"))["a"]
open("out.txt", "w").write(str(a))
json.dump({"v": a}, open("m.json", "w"))
"""
STAGE = """stages:
  s:
    cmd: python make.py
    deps: [make.py]
    params: [a]
    outs:
      - out.txt:
          cache: %s
    metrics:
      - m.json:
          cache: %s
"""


def sh(cmd: list[str], cwd: Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def git(cwd: Path, *args: str) -> str:
    return sh(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd)


def revert_restores(tmp_path: Path, out_cached: bool, metrics_cached: bool) -> tuple[bool, bool]:
    """(restored on the machine that ran it, restored on a clone that pulled the run-cache)."""
    origin, remote = tmp_path / "origin", tmp_path / "remote"
    origin.mkdir()
    git(origin, "init", "-q")
    sh(["dvc", "init", "-q"], origin)
    sh(["dvc", "remote", "add", "-d", "store", str(remote)], origin)
    (origin / "dvc.yaml").write_text(STAGE % (str(out_cached).lower(), str(metrics_cached).lower()))
    (origin / "params.yaml").write_text("a: 1\n")
    (origin / "make.py").write_text(MAKE)
    sh(["dvc", "repro"], origin)
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "a=1")
    sh(["dvc", "push", "--run-cache"], origin)

    def change_and_revert(repo: Path) -> bool:
        (repo / "params.yaml").write_text("a: 2\n")
        sh(["dvc", "repro"], repo)
        (repo / "params.yaml").write_text("a: 1\n")
        out = sh(["dvc", "repro"], repo)
        assert (repo / "out.txt").read_text() == "1"
        return "is cached - skipping run" in out and "Running stage" not in out

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    sh(["dvc", "pull", "--run-cache"], clone)
    return change_and_revert(origin), change_and_revert(clone)


@pytest.mark.parametrize(("out_cached", "metrics_cached", "same_machine", "other_machine"), [
    (True, True, True, True),  # everything cached: restored anywhere the remote reaches
    (True, False, True, False),  # `cache: false` metrics: restored only where the stage ran
    (False, True, False, False),  # a `cache: false` plain output keeps the stage out of the run-cache
])  # fmt: skip
def test_which_outputs_let_the_run_cache_restore_a_stage(tmp_path, out_cached, metrics_cached, same_machine, other_machine):
    assert revert_restores(tmp_path, out_cached, metrics_cached) == (same_machine, other_machine)
