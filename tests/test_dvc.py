"""`dvc repro` from the repository root, on the real Fashion-MNIST and the shipped default teacher."""

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
        if src.is_file() and not rel.startswith(("data/", "metrics/", "plots/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    git = ["git", "-c", "user.email=test@example.com", "-c", "user.name=test"]
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def test_dvc_repro_prepare_is_reproducible(tmp_path, real_fmnist):
    locks = []
    for name in ("a", "b"):
        repo = checkout_copy(tmp_path / name)
        assert "Running stage 'prepare'" in run(["dvc", "repro", "prepare"], repo)
        metrics = json.loads((repo / "metrics" / "prepare.json").read_text())
        assert metrics["train"]["num_samples"] == 5000 and metrics["val"]["num_samples"] == 1000
        locks.append(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]["outs"])
    assert locks[0] == locks[1]  # two independent runs: the same output hash


def test_dvc_repro_default_dag_runs_once_with_a_teacher_that_beats_random(tmp_path, real_fmnist):
    repo = checkout_copy(tmp_path / "repo")
    out = run(["dvc", "repro"], repo)
    for stage in ("prepare", "teacher", "extract", "train_parts", "export_parts"):
        assert f"Running stage '{stage}'" in out
    teacher = json.loads((repo / "metrics" / "teacher.json").read_text())
    assert teacher["init"] == "checkpoint"
    assert teacher["knn_teacher"] >= teacher["knn_random_vit"] + 0.10  # the shipped teacher's promise
    parts = json.loads((repo / "metrics" / "parts.json").read_text())["parts"]
    assert parts["min_share"] >= 0.03 and parts["max_share"] <= 0.55 and parts["coherence_gain"] >= 0.15
    assert (repo / "plots" / "parts" / "val_parts.png").stat().st_size > 0
    exported = json.loads((repo / "metrics" / "export_parts.json").read_text())
    assert exported == {"grid": 8, "num_parts": 6, "train_samples": 5000, "val_samples": 1000}
    again = run(["dvc", "repro"], repo)
    assert "Running stage" not in again
    assert "up to date" in run(["dvc", "status"], repo)
