"""Resources: a full disk and a batch too big for memory fail with a message that says what to do,
before anything is written."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch

from conftest import write_params
from pipeline.config import PrepareConfig, load_pretrain_config
from pipeline.data.prepare import prepare_dataset
from pipeline.io import OutOfSpaceError, ensure_free_space
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
