"""Tiny finished stage outputs, built in-process in seconds, for tests that run a later stage on them
(test_concurrent, test_free_space, test_corrupt): build them once per module (tmp_path_factory)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from conftest import REPO, write_idx

TINY_VIT = dict(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2)


def fmnist(root: Path) -> Path:
    """A Fashion-MNIST-shaped idx directory (as conftest's fake_fmnist): 300 train / 120 val random images."""
    rng = np.random.default_rng(123)
    root.mkdir(parents=True)
    for stem, n in (("train", 300), ("t10k", 120)):
        labels = np.arange(n, dtype=np.uint8) % 10
        rng.shuffle(labels)
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    return root


def prepared(root: Path) -> Path:
    """60 train / 20 val / 50 hold-out images in shards of 25."""
    from pipeline.config import PrepareConfig
    from pipeline.data.prepare import prepare_dataset

    source = fmnist(root / "fmnist")
    prepare_dataset(PrepareConfig(root=str(source), train_limit=60, val_limit=20, holdout_size=50, shard_size=25,
                                  num_workers=0), root / "prepared")  # fmt: skip
    return root / "prepared"


def teacher(root: Path) -> Path:
    """A random tiny ViT saved as the teacher stage saves one."""
    from pipeline.config import TeacherConfig, resolved_config
    from pipeline.models.checkpoint import build_vit, save_backbone

    path = root / "teacher"
    path.mkdir(parents=True)
    torch.manual_seed(0)
    save_backbone(build_vit(**TINY_VIT), path / "checkpoint_teacher.pth")
    (path / "config.json").write_bytes(resolved_config(TeacherConfig.model_validate(TINY_VIT), "teacher"))
    return path


def parts(root: Path, prepared_dir: Path, teacher_dir: Path) -> Path:
    """The attention-heads part source (no training) on the teacher's extracted features."""
    from pipeline.config import ExtractConfig, PartsConfig
    from pipeline.features import extract_features
    from pipeline.parts.build import build_parts

    extract_features(ExtractConfig(batch_size=8), prepared_dir, teacher_dir, root / "features")
    build_parts(PartsConfig(method="attention_heads"), prepared_dir, teacher_dir, root / "features", root / "parts",
                references=False)  # fmt: skip
    return root / "parts"


def pretrained(root: Path) -> Path:
    """A pretrain-shaped output of the teacher's shape: encoder.pth (official format) + meta.json."""
    from pipeline.models.checkpoint import build_vit, save_backbone

    path = root / "pretrained"
    path.mkdir(parents=True)
    torch.manual_seed(1234)
    save_backbone(build_vit(**TINY_VIT), path / "encoder.pth", dtype=torch.float32)
    (path / "meta.json").write_text(json.dumps({**TINY_VIT, "seed": 0, "masking": "semantic"}))
    return path


def every_output(root: Path) -> dict[str, Path]:
    """Prepared data, teacher, part learner and a pretrained encoder, each a finished stage output under ``root``."""
    prepared_dir, teacher_dir = prepared(root), teacher(root)
    return {"prepared": prepared_dir, "teacher": teacher_dir, "parts": parts(root, prepared_dir, teacher_dir),
            "pretrained": pretrained(root)}  # fmt: skip


# Two runs started at the same instant: each process imports everything first, then waits for a file.
STARTER = """
import sys, time
from pathlib import Path
import pipeline.features, pipeline.parts.export, pipeline.mae.train  # the slow imports, before the start line
from stages.cli import app
Path(sys.argv[2]).touch()
while not Path(sys.argv[1]).exists():
    time.sleep(0.001)
app(sys.argv[3:], prog_name="semmae")
"""


def run_together(cwd: Path, *commands: list[str], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run ``semmae <command>`` for each command in its own process, all released at the same moment."""
    go = cwd / ".go"
    go.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs, ready = [], []
    for i, args in enumerate(commands):
        ready.append(cwd / f".ready{i}")
        ready[-1].unlink(missing_ok=True)
        procs.append(subprocess.Popen([sys.executable, "-c", STARTER, str(go), str(ready[-1]), *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    deadline = time.monotonic() + timeout
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    go.touch()
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            out, err = p.communicate()
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        results[-1].pid = p.pid
    go.unlink(missing_ok=True)
    for r in ready:
        r.unlink(missing_ok=True)
    return results
