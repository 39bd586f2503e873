"""Resources: a full disk and a batch too big for memory fail with a message that says what to do,
before anything is written; the disk space prepare asks for bounds what it writes; a disk that fills up
anyway (another writer) fails as cleanly, leaving nothing half-written."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import make_imagefolder, write_params
from pipeline.config import PrepareConfig, load_pretrain_config
from pipeline.data import prepare as prepare_module
from pipeline.data.prepare import prepare_dataset
from pipeline.io import OutOfSpaceError, atomic_output_dir, atomic_write_bytes, ensure_free_space
from pipeline.sharded import run_sharded
from pipeline.mae import train as mae_train
from pipeline.mae.model import MaskedAutoencoder

Usage = namedtuple("Usage", "total used free")


def tiny_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * free, 9 * free, free))


def test_free_space_check_names_the_output_and_the_numbers(tmp_path, monkeypatch):
    tiny_disk(monkeypatch, 100 << 20)
    ensure_free_space(tmp_path / "out", 1 << 20, "x")  # 1 MiB + margin fits in 100 MiB
    with pytest.raises(OutOfSpaceError, match=r"out: the shards needs about 1.00 GiB but .* has 0.10 GiB free"):
        ensure_free_space(tmp_path / "out", 1 << 30, "the shards")


def test_prepare_checks_the_disk_before_writing_a_shard(fake_fmnist, tmp_path, monkeypatch):
    root, _ = fake_fmnist
    tiny_disk(monkeypatch, 1 << 20)  # 1 MiB free: not even the margin
    with pytest.raises(OutOfSpaceError, match="the prepared shards"):
        prepare_dataset(PrepareConfig(root=str(root), train_limit=100, val_limit=20, holdout_size=50, num_workers=0), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_out_of_memory_suggests_accumulation(part_shards, tmp_path, monkeypatch):
    write_params(tmp_path / "params.yaml", pretrain={"common": {
        "img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16,
        "decoder_depth": 1, "decoder_num_heads": 2, "epochs": 1, "batch_size": 16, "steps_per_epoch": 2,
        "warmup_epochs": 0.5, "shuffle_buffer": 16}, "variants": {"v": {}}})  # fmt: skip
    cfg = load_pretrain_config(tmp_path / "params.yaml", "v", 0)

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MaskedAutoencoder, "forward", oom)
    with pytest.raises(mae_train.TrainingError, match=r"micro-batch of 16 images per rank .*set pretrain accum_steps: 2 "
                                                      r"\(micro-batch 8 images per rank"):  # fmt: skip
        mae_train.pretrain(cfg, part_shards, tmp_path / "out", tmp_path / "resume")
    assert not (tmp_path / "out").exists()


def disk_usage(root: Path) -> int:
    """What ``du -s --block-size=1`` reports: the blocks allocated to the tree's files and directories."""
    return sum(os.lstat(p).st_blocks * 512 for p in (root, *root.rglob("*")))


@pytest.fixture
def images(tmp_path):
    """JPEG, grayscale and RGBA PNGs, and palette PNGs (stored as RGB: three times their pixels' bytes)."""
    make_imagefolder(tmp_path / "images" / "train", {"zebra": 30, "cat": 25, "dog": 20}, seed=1)
    make_imagefolder(tmp_path / "images" / "val", {"cat": 6, "dog": 5}, seed=2)
    rng = np.random.default_rng(3)
    (tmp_path / "images" / "train" / "palette").mkdir()
    for i in range(16):
        img = Image.frombytes("P", (80 + i, 96), rng.integers(0, 256, 96 * (80 + i), dtype=np.uint8).tobytes())
        img.putpalette(rng.integers(0, 256, 768).tolist())
        img.save(tmp_path / "images" / "train" / "palette" / f"p{i}.png")
    return tmp_path / "images"


SOURCES = {  # fixture, config; small limits keep the real data set fast
    "random_pixels": ("fake_fmnist", dict(train_limit=None, val_limit=None, holdout_size=50, shard_size=100)),
    "imagefolder": ("images", dict(source="imagefolder", val_dir="val", train_limit=None, val_limit=None, holdout_size=6,
                                   shard_size=16)),
    "imagefolder_resized": ("images", dict(source="imagefolder", val_dir="val", resize=24, train_limit=None,
                                           val_limit=None, holdout_size=6, shard_size=16, on_corrupt="skip")),
    "real_fmnist": ("real_fmnist", dict(train_limit=1500, val_limit=500, holdout_size=300)),
}  # fmt: skip


@pytest.mark.parametrize("source", SOURCES)
def test_the_space_prepare_asks_for_bounds_what_it_writes(source, request, tmp_path, monkeypatch):
    """The free space ensure_free_space requires (without its margin) is at least the output's disk usage
    (du), and at most 1.5 times it. The random pixels are the worst case for PNG (they do not compress)."""
    fixture, kw = SOURCES[source]
    root = request.getfixturevalue(fixture)
    root = root[0] if isinstance(root, tuple) else root
    required = []

    def check(path, needed, what, files=0):
        required.append(ensure_free_space(path, needed, what, files))
        return required[-1]

    monkeypatch.setattr(prepare_module, "ensure_free_space", check)
    prepare_dataset(PrepareConfig(root=str(root), num_workers=0, **kw), tmp_path / "out")
    used = disk_usage(tmp_path / "out")
    assert len(required) == 1 and used <= required[0] <= 1.5 * used, (required, used)
    assert sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file()) <= required[0]


def no_space_after(monkeypatch, writes: int, code: int = errno.ENOSPC) -> None:
    """Make the tar writer's ``writes``-th sample fail as a full disk (or quota) does."""
    real, calls = wds.TarWriter.write, []

    def write(self, sample):
        calls.append(1)
        if len(calls) == writes:
            raise OSError(code, os.strerror(code))
        return real(self, sample)

    monkeypatch.setattr(wds.TarWriter, "write", write)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_disk_that_fills_up_while_writing_fails_cleanly_and_keeps_the_old_output(fake_fmnist, tmp_path, monkeypatch,
                                                                                 code):  # fmt: skip
    root, _ = fake_fmnist
    cfg = PrepareConfig(root=str(root), train_limit=100, val_limit=20, holdout_size=50, shard_size=30, num_workers=0)
    prepare_dataset(cfg, tmp_path / "out")
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    no_space_after(monkeypatch, 120, code)  # in the second split's shards
    with pytest.raises(OutOfSpaceError, match=rf"out: the disk filled up while writing it \({os.strerror(code)}\); nothing "
                                              r"was written \(the partial output was removed\) and .* GiB free: free some "
                                              r"space \(e\.g\. `dvc gc`\)"):  # fmt: skip
        prepare_dataset(cfg, tmp_path / "out")
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmnist", "out"]  # no temporary left


def test_atomic_file_writes_turn_a_full_disk_into_the_clear_error(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_bytes(b"old")
    real_fsync = os.fsync

    def fsync(fd, code=[errno.EDQUOT, errno.EIO]):  # noqa: B006 (one failure per call: quota, then an I/O error)
        raise OSError(code[0], os.strerror(code.pop(0)))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutOfSpaceError, match=r"metrics\.json: the disk filled up while writing it \(Disk quota exceeded\)"):
        atomic_write_bytes(target, b"new")
    with pytest.raises(OSError) as other:  # any other error stays what it was
        atomic_write_bytes(target, b"new")
    assert other.type is OSError and other.value.errno == errno.EIO
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    with pytest.raises(OutOfSpaceError, match=r"out: the disk filled up"):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_bytes(b"a")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_sharded_stages_turn_a_full_disk_into_the_clear_error(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "index.json").write_text("old")

    def work(job, tmp, bar):
        (tmp / f"{job}.tar").write_bytes(b"x" * 100)
        if job == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutOfSpaceError, match=r"out: the disk filled up while writing it \(No space left on device\)"):
        run_sharded(tmp_path / "out", [0, 1, 2, 3], work, lambda tmp: {}, [1, 1, 1, 1], "test")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["out", "out/index.json"]


def test_a_failure_between_the_two_renames_puts_the_old_output_back(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "index.json").write_text("old")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old output has moved aside; the new one cannot take its place
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutOfSpaceError, match=r"out: the disk filled up while writing it"):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "index.json").write_text("new")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["out", "out/index.json"]
    assert (tmp_path / "out" / "index.json").read_text() == "old"
