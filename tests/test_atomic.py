"""Atomic outputs: a SIGKILL at any moment never leaves a truncated file or a partial shard set under a
final name, and the temporaries a killed writer leaves behind are removed by the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_params
from pipeline.io import atomic_output_dir, atomic_write_bytes, file_sha256

BIN = Path(sys.executable).parent
DEAD_PID = 2**22 + 12345  # above Linux's pid_max: no such process


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead_dir, dead_file = tmp_path / f".out.tmp-{DEAD_PID}", tmp_path / f".f.json.tmp-{DEAD_PID}"
    live_dir = tmp_path / f".out.tmp-{os.getppid()}"  # the parent process runs
    for d in (dead_dir, live_dir):
        d.mkdir()
        (d / "shard.tar").write_bytes(b"x" * 100)
    dead_file.write_bytes(b"{")
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    atomic_write_bytes(tmp_path / "f.json", b"{}")
    assert not dead_dir.exists() and not dead_file.exists() and live_dir.exists()
    assert (tmp_path / "out" / "a").read_text() == "a"


def valid_shard_set(out: Path) -> bool:
    index = json.loads((out / "index.json").read_text())
    for split, info in index["splits"].items():
        for shard in info["shards"]:
            assert file_sha256(out / split / shard["file"]) == shard["sha256"], shard["file"]
    return True


@pytest.mark.slow
def test_sigkill_while_writing_shards_never_leaves_a_partial_output(fake_fmnist, tmp_path):
    root, _ = fake_fmnist
    write_params(tmp_path / "params.yaml", prepare={"root": str(root), "train_limit": 250, "val_limit": 120, "holdout_size": 50,
                                                    "shard_size": 10, "num_workers": 0})  # fmt: skip
    args = [str(BIN / "semmae"), "prepare", "--out", "data/prepared", "--metrics", "metrics/prepare.json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    subprocess.run(args, cwd=tmp_path, env=env, check=True, capture_output=True)
    duration = time.monotonic() - start
    out, metrics = tmp_path / "data" / "prepared", tmp_path / "metrics" / "prepare.json"
    first = file_sha256(out / "index.json")
    rng = np.random.default_rng(0)
    mid_write = 0
    for delay in rng.uniform(0.0, 0.2, size=6):
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mine = tmp_path / "data" / f".prepared.tmp-{proc.pid}"  # this run's temporary shard directory
        deadline = time.monotonic() + 10 * duration + 30
        while proc.poll() is None and time.monotonic() < deadline and not mine.exists():
            time.sleep(0.002)
        time.sleep(delay)  # somewhere while the shards are being written (or just after)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # whatever the moment: the complete output of some run (all runs write the same bytes)
        assert valid_shard_set(out) and file_sha256(out / "index.json") == first
        assert json.loads(metrics.read_text())["train"]["num_samples"] == 250
        temporaries = [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".prepared.tmp-")]
        assert temporaries in ([], [mine])  # each run removed the previous killed run's
        mid_write += mine.exists()
    assert mid_write, "no kill landed while shards were written: the test proved nothing"
    subprocess.run(args, cwd=tmp_path, env=env, check=True, capture_output=True)
    leftovers = [p.name for p in (tmp_path / "data").iterdir() if p.name != "prepared"]
    leftovers += [p.name for p in (tmp_path / "metrics").iterdir() if p.name != "prepare.json"]
    assert leftovers == []  # the killed runs' temporaries are gone


def test_a_staged_curve_log_replaces_the_curves_only_when_published(tmp_path):
    """A stage's curves: the rows go to a hidden sibling of this process while it runs; the previous run's
    curves stay as they were until publish(), which renames the rows over them and removes the staged rows
    a dead run left."""
    from pipeline.curves import CurveLog

    curves = tmp_path / "c.tsv"
    curves.write_text("step\tloss\n1\t9\n")
    dead = tmp_path / f".c.tsv.tmp-{DEAD_PID}"
    dead.write_text("step\tloss\n1\t8\n")
    log = CurveLog(curves, staged=True)
    log(1, {"loss": 0.5})
    assert log.live == tmp_path / f".c.tsv.tmp-{os.getpid()}" and log.live.read_text() == "step\tloss\n1\t0.5\n"
    assert curves.read_text() == "step\tloss\n1\t9\n"  # a failure from here on leaves it as it was
    log(2, {"loss": 0.25})
    log.publish()
    assert curves.read_text() == "step\tloss\n1\t0.5\n2\t0.25\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tsv"]
