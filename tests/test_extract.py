"""`extract`: feature-shard schema and values, determinism, seeded limit, 2-process == 1-process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import write_params
from pipeline.config import ExtractConfig, PrepareConfig
from pipeline.data.images import normalize, to_square
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import decode_image, iter_samples, shard_paths
from pipeline.features import extract_features, load_features, read_features_index
from pipeline.io import file_sha256
from pipeline.models.checkpoint import CheckpointError, build_vit, save_backbone
from pipeline.config import TeacherConfig, resolved_config

TINY = dict(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2)
BIN = Path(sys.executable).parent


@pytest.fixture
def setup(fake_fmnist, tmp_path):
    root, _ = fake_fmnist
    prepared = tmp_path / "prepared"
    prepare_dataset(PrepareConfig(root=str(root), train_limit=90, val_limit=30, holdout_size=50, shard_size=20, num_workers=0), prepared)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    torch.manual_seed(0)
    cfg = TeacherConfig.model_validate(TINY)
    save_backbone(build_vit(**TINY), teacher / "checkpoint_teacher.pth")
    (teacher / "config.json").write_bytes(resolved_config(cfg, "teacher"))
    return prepared, teacher


def digest(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_schema_metadata_and_values_match_the_teacher(setup, tmp_path):
    prepared, teacher = setup
    result = extract_features(ExtractConfig(batch_size=7), prepared, teacher, tmp_path / "f")
    assert result == {"dim": 32, "grid": [4, 4], "train_rows": 90, "val_rows": 30}
    index = read_features_index(tmp_path / "f")
    meta = index["teacher"]
    assert meta["teacher_sha256"] == file_sha256(teacher / "checkpoint_teacher.pth")
    assert (meta["arch"], meta["grid"], meta["dim"]) == ("vit_tiny_patch16_224", [4, 4], 32)
    assert [f["file"] for f in index["splits"]["train"]["files"]] == [f"train-00000{i}.arrow" for i in range(5)]
    with pa.memory_map(str(tmp_path / "f" / "train" / "train-000000.arrow")) as src:
        table = pa.ipc.open_file(src).read_all()
    assert table.schema.field("cls_token").type == pa.list_(pa.float16(), 32)
    assert table.schema.field("patch_tokens").type == pa.list_(pa.float16(), 16 * 32)
    assert json.loads(table.schema.metadata[b"semmae"])["teacher_sha256"] == meta["teacher_sha256"]

    feats = load_features(tmp_path / "f", "val")
    assert feats["cls"].shape == (30, 32) and feats["patches"].shape == (30, 16, 32) and feats["cls"].dtype == np.float16
    samples = list(iter_samples(shard_paths(prepared, "val")))
    assert feats["key"].tolist() == [s["__key__"] for s in samples] and feats["label"].tolist() == [s["cls"] for s in samples]
    from pipeline.teacher.build import load_teacher

    vit = load_teacher(teacher)[0]
    x = torch.from_numpy(np.stack([to_square(decode_image(s["image"]), 16) for s in samples[:5]])).float() / 255
    with torch.no_grad():
        ref = vit.forward_features(normalize(x)).to(torch.float16).numpy()
    np.testing.assert_array_equal(feats["cls"][:5], ref[:, 0])
    np.testing.assert_array_equal(feats["patches"][:5], ref[:, 1:])


def test_deterministic_and_seeded_limit(setup, tmp_path):
    prepared, teacher = setup
    extract_features(ExtractConfig(limit=25, splits=["train"]), prepared, teacher, tmp_path / "a")
    extract_features(ExtractConfig(limit=25, splits=["train"]), prepared, teacher, tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    keys = load_features(tmp_path / "a", "train")["key"]
    assert len(keys) == 25 and len(set(keys)) == 25
    extract_features(ExtractConfig(limit=25, splits=["train"], seed=1), prepared, teacher, tmp_path / "c")
    assert set(load_features(tmp_path / "c", "train")["key"]) != set(keys)


def test_bad_teacher_fails_before_output(setup, tmp_path):
    prepared, _ = setup
    with pytest.raises(CheckpointError, match="run the teacher stage first"):
        extract_features(ExtractConfig(), prepared, tmp_path / "none", tmp_path / "f")
    assert not (tmp_path / "f").exists()


@pytest.mark.slow
def test_two_processes_equal_one_process(setup, tmp_path):
    prepared, teacher = setup
    write_params(tmp_path / "params.yaml", extract={"batch_size": 8})
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("OMP_NUM_THREADS", None)  # one process uses every core, torchrun's ranks one thread each
    common = ["--params", "params.yaml", "--prepared", str(prepared), "--teacher", str(teacher)]
    one = subprocess.run(["semmae", "extract", *common, "--out", "one", "--metrics", "m1.json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python",
         "semmae", "extract", *common, "--out", "two", "--metrics", "m2.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    assert json.loads((tmp_path / "m1.json").read_text()) == json.loads((tmp_path / "m2.json").read_text())
