"""Free-space checks of the stages after prepare (test_resources.py has prepare's): with too little space
each refuses before any compute, with the OutOfSpaceError naming the output, the space it needs and what
to do, and writes nothing; the space extract and export_parts ask for covers what they write."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import tiny_stages
from pipeline.config import ExportPartsConfig, ExtractConfig, PretrainConfig
from pipeline.config.finetune import FinetuneConfig
from pipeline.io import OutOfSpaceError

Usage = namedtuple("Usage", "total used free")
FREE = 1 << 20  # 1 MiB: below the 64 MiB margin whatever the estimate


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tiny_stages.every_output(tmp_path_factory.mktemp("built"))


def tiny_disk(monkeypatch, under: Path | None = None) -> None:
    """``FREE`` bytes free on every filesystem (``under``: only for paths inside it)."""
    real = shutil.disk_usage

    def usage(path):
        if under is None or Path(path).resolve().is_relative_to(under.resolve()):
            return Usage(10 * FREE, 9 * FREE, FREE)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", usage)


def no_compute(monkeypatch, target, name: str) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} ran: the free-space check must come before any compute")

    monkeypatch.setattr(target, name, refuse)


def refusal(output: Path, what: str) -> str:
    return rf"{output}: {what} needs about \d+\.\d\d GiB but \S+ has 0\.00 GiB free: free some space \(e\.g\. `dvc gc`\)"


def nothing_in(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def test_extract_refuses_before_compute(built, tmp_path, monkeypatch):
    from pipeline import features

    tiny_disk(monkeypatch)
    no_compute(monkeypatch, features, "_extract_shard")
    with pytest.raises(OutOfSpaceError, match=refusal(tmp_path / "features", r"the feature shards \(extract\.limit\)")):
        features.extract_features(ExtractConfig(batch_size=8), built["prepared"], built["teacher"], tmp_path / "features")
    assert nothing_in(tmp_path) == []


def test_export_parts_refuses_before_compute(built, tmp_path, monkeypatch):
    from pipeline.parts import export

    tiny_disk(monkeypatch)
    no_compute(monkeypatch, export, "soft_part_maps")
    with pytest.raises(OutOfSpaceError, match=refusal(tmp_path / "ps", r"the part shards \(the prepared images \+ maps\)")):
        export.export_parts(ExportPartsConfig(grid=None, batch_size=8), built["prepared"], built["teacher"],
                            built["parts"], tmp_path / "ps")  # fmt: skip
    assert nothing_in(tmp_path) == []


@pytest.mark.parametrize("stage", ["extract", "export_parts"])
def test_the_space_asked_for_covers_what_is_written(built, tmp_path, monkeypatch, stage):
    from pipeline import features
    from pipeline.parts import export

    module = features if stage == "extract" else export
    asked = []

    def spy(path, needed, what, *args, **kwargs):
        asked.append(needed)

    monkeypatch.setattr(module, "ensure_free_space", spy)
    if stage == "extract":
        features.extract_features(ExtractConfig(batch_size=8), built["prepared"], built["teacher"], tmp_path / "out")
    else:
        export.export_parts(ExportPartsConfig(grid=None, batch_size=8), built["prepared"], built["teacher"],
                            built["parts"], tmp_path / "out")  # fmt: skip
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert len(asked) == 1 and written <= asked[0] <= 2 * written, (asked, written)


TINY_MAE = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                decoder_num_heads=2, epochs=1, batch_size=16, steps_per_epoch=2, warmup_epochs=0.5, shuffle_buffer=16)  # fmt: skip


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("full", ["resume", "out"])
def test_training_stages_refuse_before_compute(built, part_shards, tmp_path, monkeypatch, stage, full):
    """Two checks per stage: the resume checkpoints (last + prev) and the outputs, each on its own filesystem here."""
    from pipeline.finetune import train as finetune_train
    from pipeline.mae import train as pretrain_train

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    resume, out = tmp_path / "a" / "resume", tmp_path / "b" / "out"
    tiny_disk(monkeypatch, under=(resume if full == "resume" else out).parent)
    no_compute(monkeypatch, torch.nn.Module, "__call__")  # no forward pass of any model
    what = {"resume": rf"{stage}'s resume checkpoints \(last\.pth \+ prev\.pth\)",
            "out": {"pretrain": r"pretrain's outputs \(encoder\.pth, mae\.pth\)",
                    "finetune": r"finetune's outputs \(model\.pth\)"}[stage]}[full]  # fmt: skip
    with pytest.raises(OutOfSpaceError, match=refusal(resume if full == "resume" else out, what)):
        if stage == "pretrain":
            pretrain_train.pretrain(PretrainConfig(**TINY_MAE), part_shards, out, resume)
        else:
            shape = {k: tiny_stages.TINY_VIT[k] for k in finetune_train.SHAPE_KEYS}
            finetune_train.finetune(FinetuneConfig(batch_size=16, epochs=1, warmup_epochs=0.5), shape, built["prepared"],
                                    out, 0, built["pretrained"] / "encoder.pth", resume, "fp")  # fmt: skip
    assert nothing_in(tmp_path / "a") == [] and nothing_in(tmp_path / "b") == []
