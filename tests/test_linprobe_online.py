"""The linear probe's online mode: streamed from the prepared shards, augmented, resumable, and the same
heads under torchrun as in one process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_params
from pipeline.config import PrepareConfig
from pipeline.config.linprobe import LinprobeConfig
from pipeline.data.prepare import prepare_dataset
from pipeline.models.checkpoint import build_vit, save_backbone

BIN = Path(sys.executable).parent
TINY = {"arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 1, "num_heads": 2, "embed_dim": 32}


def _setup(fake_fmnist, tmp_path: Path, shard_size: int = 1000) -> tuple[Path, Path]:
    """Prepared shards (100 train, 30 holdout, 40 val images of 28 x 28) and a tiny pretrain output."""
    root, _ = fake_fmnist
    prepare_dataset(PrepareConfig(root=str(root), train_limit=100, val_limit=40, holdout_size=30, shard_size=shard_size,
                                  num_workers=0), tmp_path / "prepared")  # fmt: skip
    enc = tmp_path / "enc"
    enc.mkdir()
    torch.manual_seed(0)
    save_backbone(build_vit(**TINY), enc / "encoder.pth", dtype=torch.float32)
    (enc / "meta.json").write_text(json.dumps({**TINY, "masking": "semantic", "seed": 0, "epochs": 1}))
    return tmp_path / "prepared", enc


def test_online_batch_splits_the_global_batch_over_ranks_and_loader_batches():
    from pipeline.eval.linprobe import online_batch

    cfg = LinprobeConfig(mode="online", batch_size=64, eval_batch_size=24)
    assert online_batch(cfg, 1000, 2) == (64, 32, 16)  # 32 per rank, read as 2 loader batches of 16
    assert online_batch(cfg, 1000, 1) == (64, 64, 16)
    assert online_batch(cfg, 40, 1) == (40, 40, 20)  # at most the training images, as cached mode
    with pytest.raises(ValueError, match=r"batch_size=63 .* not divisible by the 2 ranks"):
        online_batch(cfg.model_copy(update={"batch_size": 63}), 1000, 2)


def test_cached_and_online_probes_agree_without_augmentation(fake_fmnist, tmp_path):
    """Without augmentation online mode trains on the evaluation crop: for these square images timm's
    eval transform gives exactly the pixels cached mode encodes (non-square ones may differ by a pixel of
    offset: torchvision truncates the resized long side where cached mode rounds). One full batch per
    epoch, so both see the same images each step (in another order: equal up to float summation order)."""
    from pipeline.eval.encode import vit_encoder
    from pipeline.eval.probe_run import _probe

    prepared, _ = _setup(fake_fmnist, tmp_path, shard_size=25)
    torch.manual_seed(0)
    vit = build_vit(**TINY)
    cfg = LinprobeConfig(epochs=3, warmup_epochs=1, batch_size=100, base_lr=[1.0, 10.0], eval_batch_size=32, knn_k=5,
                         shuffle_buffer=1)  # fmt: skip
    cpu = torch.device("cpu")
    cached, ch = _probe(cfg, prepared, 16, {"": vit_encoder(vit, cpu)}, cpu)[0][""]
    online_cfg = cfg.model_copy(update={"mode": "online"})
    online, oh = _probe(online_cfg, prepared, 16, {"": vit_encoder(vit, cpu)}, cpu)[0][""]
    assert cached["base_lr"] == online["base_lr"] and set(cached) == set(online)
    for (k, a), (_, b) in zip(ch.state_dict().items(), oh.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)
    for key in ("knn_top1", "holdout_knn_top1", "top1", "top5", "holdout_top1"):  # the same features, close heads
        assert cached[key] == pytest.approx(online[key], abs=1e-6), key  # cached: a float32 mean


def test_online_probe_trains_on_augmented_crops(fake_fmnist, tmp_path, monkeypatch):
    """augment: timm's RandomResizedCrop (cfg.crop_scale) + flip on the training stream; evaluation, k-NN and
    training without augmentation read the evaluation crop of eval_crop_pct."""
    from pipeline.eval import linprobe, probe_run
    from pipeline.eval.encode import vit_encoder

    prepared, _ = _setup(fake_fmnist, tmp_path)
    calls = []

    class Stop(Exception):
        pass

    real_encode_splits = probe_run.encode_splits

    def spy_encode_splits(*a, **kw):
        calls.append(("encode_splits", kw["splits"], kw["crop_pct"]))
        return real_encode_splits(*a, **kw)

    def spy_loader(shards, counts, transform, *a, **kw):
        calls.append(("train", transform))
        raise Stop

    monkeypatch.setattr(probe_run, "encode_splits", spy_encode_splits)
    monkeypatch.setattr(linprobe, "train_loader", spy_loader)
    monkeypatch.setattr(linprobe, "train_transform", lambda size, scale, hflip: ("rrc", size, tuple(scale), hflip))
    monkeypatch.setattr(linprobe, "eval_transform", lambda size, crop_pct: ("eval", size, crop_pct))
    torch.manual_seed(0)
    enc = {"": vit_encoder(build_vit(**TINY), torch.device("cpu"))}
    for augment, train_tf in ((True, ("rrc", 16, (0.2, 1.0), 0.5)), (False, ("eval", 16, 0.875))):
        calls.clear()
        cfg = LinprobeConfig(mode="online", augment=augment, crop_scale=[0.2, 1.0], eval_crop_pct=0.875, batch_size=16)
        with pytest.raises(Stop):
            probe_run._probe(cfg, prepared, 16, enc, torch.device("cpu"))
        assert calls == [("encode_splits", ("train", "holdout", "val"), 0.875), ("train", train_tf)]


def test_a_killed_online_probe_resumes_to_the_same_head(fake_fmnist, tmp_path, monkeypatch, caplog):
    """Killed right after its first epoch's checkpoint, rerun: it starts at epoch 2 and writes the heads,
    metrics and curves of an unbroken run (augmented, two loader workers: their draws are reseeded per epoch)."""
    from pipeline.curves import CurveLog
    from pipeline.eval import probe_run
    from pipeline.resume import ResumeStore

    prepared, enc = _setup(fake_fmnist, tmp_path, shard_size=25)
    cfg = LinprobeConfig(mode="online", augment=True, epochs=3, warmup_epochs=1, batch_size=16, base_lr=[1.0, 10.0],
                         eval_batch_size=8, knn_k=5, num_workers=2, shuffle_buffer=20)  # fmt: skip
    cpu = torch.device("cpu")

    def run(name: str):
        curves = CurveLog(tmp_path / name / "c.tsv")
        metrics = probe_run.probe_pretrained(cfg, prepared, enc, tmp_path / name / "out", cpu, curves,
                                             resume_dir=tmp_path / name / "resume", curve_rows=curves.rows)  # fmt: skip
        return metrics, curves.rows

    whole, whole_rows = run("unbroken")

    class Killed(Exception):
        pass

    class DyingStore(ResumeStore):
        def save(self, state):
            super().save(state)
            raise Killed

    monkeypatch.setattr(probe_run, "ResumeStore", DyingStore)
    with pytest.raises(Killed):
        run("broken")
    assert (tmp_path / "broken" / "resume" / "last.pth").is_file() and not (tmp_path / "broken" / "out").exists()
    monkeypatch.setattr(probe_run, "ResumeStore", ResumeStore)
    with caplog.at_level(logging.INFO, logger="pipeline.eval.linprobe"):
        resumed, rows = run("broken")
    assert "resuming at epoch 2 of 3" in caplog.text  # not from scratch
    assert (tmp_path / "broken/out/head.pth").read_bytes() == (tmp_path / "unbroken/out/head.pth").read_bytes()
    assert resumed == whole and rows == whole_rows and len(rows) == 3
    assert {"top1", "top5", "knn_top1", "holdout_knn_top1", "base_lr", "holdout_top1", "holdout_by_lr"} <= set(whole)
    assert not any((tmp_path / "broken" / "resume").iterdir())


def semmae(cwd: Path, *args: str, procs: int = 1) -> None:
    cmd = [str(BIN / "semmae"), *args]
    if procs > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={procs}", "--no-python", "semmae", *args]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_online_probe_under_two_processes_equals_one(fake_fmnist, tmp_path):
    """The same global batches: 1 process with 2 loader workers reads streams 0 and 1 as its two loader
    batches per step, 2 processes read one stream each; the gathered features and hence the heads (augmented
    training, global-batch BatchNorm statistics), curves and metrics are the same, bit for bit."""
    _setup(fake_fmnist, tmp_path, shard_size=20)  # 4 train shards: 2 per stream
    base = {"mode": "online", "augment": True, "epochs": 2, "warmup_epochs": 1, "batch_size": 16,
            "base_lr": [1.0, 10.0], "eval_batch_size": 8, "knn_k": 5, "shuffle_buffer": 10}  # fmt: skip
    outputs = {}
    for procs, workers in ((1, 2), (2, 0)):
        write_params(tmp_path / f"p{procs}.yaml", linprobe={**base, "num_workers": workers})
        semmae(tmp_path, "linprobe", "--params", f"p{procs}.yaml", "--prepared", "prepared", "--pretrained", "enc",
               "--out", f"p{procs}/out", "--metrics", f"p{procs}/m.json", "--curves", f"p{procs}/c.tsv", procs=procs)
        outputs[procs] = [(tmp_path / f"p{procs}" / rel).read_bytes() for rel in ("out/head.pth", "m.json", "c.tsv")]
    assert outputs[1] == outputs[2]
    metrics = json.loads(outputs[2][1])
    assert metrics["num_classes"] == 10 and 0 <= metrics["top1"] <= 1
    assert list(metrics["holdout_by_lr"]) == ["1.0", "10.0"]


def test_the_stage_honours_mode_online_and_augment(fake_fmnist, tmp_path):
    """``semmae linprobe`` (in-process) three ways on one encoder, one full batch per epoch: online without
    augmentation trains the cached mode's head (the same evaluation crops); with augment the head trains on
    other pixels, so it and its curves differ."""
    import contextlib

    from typer.testing import CliRunner

    from stages.cli import app

    _setup(fake_fmnist, tmp_path, shard_size=25)
    base = {"epochs": 2, "warmup_epochs": 1, "batch_size": 100, "base_lr": [1.0], "eval_batch_size": 50, "knn_k": 5,
            "shuffle_buffer": 1}  # fmt: skip
    heads, metrics, losses = {}, {}, {}
    runs = {"cached": {}, "online": {"mode": "online"}, "augment": {"mode": "online", "augment": True}}
    for name, over in runs.items():
        write_params(tmp_path / f"{name}.yaml", linprobe={**base, **over})
        with contextlib.chdir(tmp_path):
            res = CliRunner().invoke(app, ["linprobe", "--params", f"{name}.yaml", "--prepared", "prepared",
                                           "--pretrained", "enc", "--out", f"{name}/out", "--metrics", f"{name}/m.json",
                                           "--curves", f"{name}/c.tsv"])  # fmt: skip
        assert res.exit_code == 0, (res.stderr[-3000:], res.exception)
        heads[name] = torch.load(tmp_path / name / "out" / "head.pth", weights_only=True)["head"]
        metrics[name] = json.loads((tmp_path / name / "m.json").read_text())
        rows = [r.split("\t") for r in (tmp_path / name / "c.tsv").read_text().splitlines()]
        losses[name] = [float(r[rows[0].index("loss")]) for r in rows[1:]]
    for key, value in heads["cached"].items():
        torch.testing.assert_close(heads["online"][key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert losses["online"] == pytest.approx(losses["cached"], rel=1e-5)
    assert metrics["online"]["top1"] == pytest.approx(metrics["cached"]["top1"], abs=1e-6)
    # augmented crops give other features: the head's BatchNorm statistics and its loss move off
    assert (heads["augment"]["0.running_mean"] - heads["online"]["0.running_mean"]).abs().max() > 1e-2
    assert losses["augment"] != pytest.approx(losses["online"], rel=1e-4)
    assert metrics["augment"]["knn_top1"] == metrics["online"]["knn_top1"]  # k-NN: un-augmented features either way
