"""`dvc repro prepare` from the repository root, on the real Fashion-MNIST (the embedded default)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO

BIN = Path(sys.executable).parent


def checkout_copy(dest: Path) -> Path:
    """Copy the repository's files (tracked + untracked, not ignored) into a fresh git repo at ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("data/", "metrics/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def test_dvc_repro_prepare_runs_once_and_is_reproducible(tmp_path, real_fmnist):
    locks = []
    for name in ("a", "b"):
        repo = checkout_copy(tmp_path / name)
        out = run(["dvc", "repro", "prepare"], repo)
        assert "Running stage 'prepare'" in out
        metrics = json.loads((repo / "metrics" / "prepare.json").read_text())
        assert metrics["train"]["num_samples"] == 5000 and metrics["val"]["num_samples"] == 1000
        assert (repo / "data" / "prepared" / "index.json").is_file()
        again = run(["dvc", "repro", "prepare"], repo)
        assert "didn't change, skipping" in again and "Running stage" not in again
        assert "up to date" in run(["dvc", "status", "prepare"], repo)
        locks.append(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]["outs"])
    assert locks[0] == locks[1]  # two independent runs: the same output hash
