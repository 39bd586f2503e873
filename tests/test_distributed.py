"""The stages that share their work over `torchrun` ranks give what one process gives; the
single-process stages run on rank 0 alone. (pretrain: test_pretrain; extract, export_parts: their tests.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_params
from pipeline.models.checkpoint import build_vit, save_backbone
from rename_audit import audit_env, renames_onto

BIN = Path(sys.executable).parent
TINY = {"arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 2, "num_heads": 2, "embed_dim": 32}


def semmae(cwd: Path, *args: str, procs: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "semmae"), *args]
    if procs > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={procs}", "--no-python", "semmae", *args]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           **(env or {})}  # fmt: skip
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_teacher_knn_and_linprobe_reference_under_two_processes_equal_one(fake_fmnist, tmp_path):
    root, _ = fake_fmnist
    # 3 train shards + 2 val shards: the two ranks get different numbers of shards. prepare is a one-process
    # stage: under torchrun rank 0 alone writes (the rename audit records who put what in place)
    write_params(tmp_path / "prepare.yaml", prepare={"root": str(root), "train_limit": 150, "val_limit": 60,
                                                     "holdout_size": 50, "shard_size": 50, "num_workers": 0})  # fmt: skip
    audit, renames = audit_env(tmp_path)
    res = semmae(tmp_path, "prepare", "--params", "prepare.yaml", "--out", "prepared", "--metrics", "prep.json",
                 procs=2, env=audit)  # fmt: skip
    assert renames_onto(renames, "prepared", "prep.json") == [("0", "prep.json"), ("0", "prepared")]
    assert "prepare runs in one process: rank 1 has nothing to do" in res.stderr
    assert json.loads((tmp_path / "prep.json").read_text())["train"]["num_samples"] == 150
    torch.manual_seed(3)
    save_backbone(build_vit(**TINY), tmp_path / "given.pth", dtype=torch.float32)
    write_params(tmp_path / "params.yaml",
                 teacher={**TINY, "checkpoint": str(tmp_path / "given.pth"), "eval_batch_size": 16, "knn_limit": 100},
                 linprobe={"epochs": 2, "warmup_epochs": 1, "batch_size": 32, "eval_batch_size": 16, "pixel_size": 8},
                 pretrain={"common": {k: v for k, v in TINY.items()} | {"decoder_embed_dim": 16, "decoder_depth": 1,
                                                                          "decoder_num_heads": 2}})  # fmt: skip
    results = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        semmae(tmp_path, "teacher", "--prepared", "prepared", "--out", f"{out}/teacher", "--metrics", f"{out}/t.json",
               "--curves", f"{out}/t.tsv", procs=procs)  # fmt: skip
        semmae(tmp_path, "linprobe_reference", "--prepared", "prepared", "--metrics", f"{out}/r.json", procs=procs)
        results[procs] = (json.loads((out / "t.json").read_text()), json.loads((out / "r.json").read_text()),
                          (out / "teacher" / "checkpoint_teacher.pth").read_bytes())  # fmt: skip
    assert results[1] == results[2]
    teacher, reference, _ = results[1]
    assert teacher["knn_images"] == {"train": 100, "val": 60}  # the seeded k-NN subset
    assert reference["num_classes"] == 10 and 0 <= reference["raw_pixels"]["top1"] <= 1
    # training a teacher is single-process: under torchrun it says so instead of training twice
    params = tmp_path / "params.yaml"
    params.write_text(params.read_text().replace("init: checkpoint", "init: train") if "init:" in params.read_text()
                      else params.read_text().replace("teacher:\n", "teacher:\n  init: train\n"))  # fmt: skip
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", "semmae", "teacher",
           "--prepared", "prepared", "--out", "t2", "--metrics", "t2.json", "--curves", "t2.tsv"]  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "run the teacher stage without torchrun" in res.stderr
    assert not (tmp_path / "t2").exists() and not list(tmp_path.glob(".t2*.tmp-*"))  # no output, no temporary (curves too)
