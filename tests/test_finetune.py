"""The finetune stages: MAE's fine-tuning recipe on timm's pieces, the pretrained encoder really loaded,
pairing by seed, hold-out vs reported split, resume after SIGKILL, and bad input refused before compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_semmae, sigkill_after_first_checkpoint, write_params
from pipeline.config.finetune import FinetuneConfig
from pipeline.finetune.train import FinetuneError, build_classifier, finetune, load_pretrained_encoder
from pipeline.models.checkpoint import CheckpointError, build_vit, save_backbone

SHAPE = {"arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
FAST = {"epochs": 2, "warmup_epochs": 0.5, "batch_size": 32, "base_lr": 1e-3, "auto_augment": "rand-m9-mstd0.5-inc1",
        "shuffle_buffer": 64, "eval_every": 1}  # fmt: skip


@pytest.fixture
def prepared(fake_fmnist, tmp_path) -> Path:
    root, _ = fake_fmnist
    params = write_params(tmp_path / "prep.yaml", prepare={"root": str(root), "train_limit": None, "val_limit": None,
                                                           "holdout_size": 60, "shard_size": 50, "num_workers": 0})  # fmt: skip
    run_semmae(tmp_path, "prepare", "--params", str(params), "--out", "prepared", "--metrics", "prep.json")
    return tmp_path / "prepared"


def fake_pretrain(directory: Path, seed: int = 0, **shape) -> Path:
    """A pretrain-shaped output: encoder.pth (official format) + meta.json."""
    shape = {**SHAPE, **shape}
    torch.manual_seed(1234)
    vit = build_vit(shape["arch"], shape["img_size"], shape["patch_size"], shape["depth"], shape["num_heads"],
                    shape["embed_dim"])  # fmt: skip
    directory.mkdir(parents=True)
    save_backbone(vit, directory / "encoder.pth", dtype=torch.float32)
    (directory / "meta.json").write_text(json.dumps({**shape, "seed": seed, "masking": "semantic"}))
    return directory


def stage(tmp_path: Path, prepared: Path, name: str, pretrained: Path | None, wait: bool = True, **over):
    params = write_params(tmp_path / f"{name}.yaml", finetune={**FAST, **over},
                          pretrain={"common": {k: v for k, v in SHAPE.items()}, "seeds": [0], "variants": {"semantic": {}}})  # fmt: skip
    common = ["--params", str(params), "--prepared", str(prepared), "--out", f"{name}/out", "--metrics",
              f"{name}/m.json", "--curves", f"{name}/c.tsv", "--resume", f"{name}/resume"]  # fmt: skip
    if pretrained is None:
        return run_semmae(tmp_path, "finetune_scratch", "--seed", "0", *common, wait=wait)
    return run_semmae(tmp_path, "finetune", "--pretrained", str(pretrained), *common, wait=wait)


def test_pretrained_encoder_is_loaded_and_the_head_is_new(tmp_path):
    enc = fake_pretrain(tmp_path / "pre")
    model = load_pretrained_encoder(build_classifier(SHAPE, 10, 0.1), enc / "encoder.pth")
    saved = torch.load(enc / "encoder.pth", weights_only=True)["state_dict"]
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.items() if not k.startswith("norm."))
    assert "norm.weight" not in got and got["fc_norm.weight"].eq(1).all()  # MAE: mean of patch tokens -> fc_norm -> head
    assert model.head.weight.abs().max() < 1e-4  # MAE's head init: trunc-normal std 2e-5
    other = fake_pretrain(tmp_path / "wide", embed_dim=48)
    with pytest.raises(CheckpointError, match="wide/encoder.pth does not fit"):
        load_pretrained_encoder(build_classifier(SHAPE, 10, 0.1), other / "encoder.pth")


def test_layer_decay_scales_each_block_and_the_loop_applies_it(prepared, tmp_path):
    """timm's layer-decay groups: the head at the full lr, block i at decay^(L + 1 - i), the embeddings lowest;
    after training, each group's lr is the schedule's lr times its scale (the loop must apply lr_scale)."""
    cfg = FinetuneConfig(**{**FAST, "epochs": 1, "layer_decay": 0.5, "min_lr": 0.0, "warmup_epochs": 0.0})
    from pipeline.finetune import train as T

    run = T._set_up(cfg, SHAPE, prepared, None, 0, None, "")
    scale = {n: g["lr_scale"] for g in run.opt.param_groups for n in [_name(run.model, g["params"][0])]}
    assert scale["head.weight"] == 1.0 and scale["blocks.1.attn.qkv.weight"] == 0.5
    assert scale["blocks.0.attn.qkv.weight"] == 0.25 and scale["patch_embed.proj.weight"] == 0.125
    T._train_epoch(run, run.model, 0, T.tqdm(disable=True))
    last_lr = T.warmup_cosine((run.steps_per_epoch - 1) / run.steps_per_epoch, 1, 0.0, cfg.peak_lr(), 0.0)
    for g in run.opt.param_groups:
        assert g["lr"] == pytest.approx(last_lr * g["lr_scale"])


def _name(model, param) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


def test_variants_of_one_seed_share_head_init_and_batches(prepared, tmp_path):
    """Pairing: a pretrained encoder and the from-scratch model fine-tuned with one seed get the same head
    initialisation and the same augmented batches; another seed differs."""
    from pipeline.finetune import train as T
    from pipeline.data.labelled import mix_seed, train_loader, train_transform

    cfg = FinetuneConfig(**FAST)
    enc = fake_pretrain(tmp_path / "pre") / "encoder.pth"
    heads, batches = [], []
    for encoder, seed in ((enc, 0), (None, 0), (enc, 1)):
        run = T._set_up(cfg, SHAPE, prepared, encoder, seed, None, "")
        heads.append(run.model.head.weight.detach().clone())
        augment = train_transform(16, cfg.crop_scale, cfg.hflip, cfg.auto_augment, cfg.random_erasing)
        loader = train_loader(run.shards, run.counts, augment, mix_seed(cfg.seed, seed), 0, 0, 1, cfg.shuffle_buffer,
                              run.micro, 0)  # fmt: skip
        batches.append(next(iter(loader)))
    assert torch.equal(heads[0], heads[1]) and torch.equal(batches[0][0], batches[1][0])
    assert torch.equal(batches[0][1], batches[1][1])
    assert not torch.equal(heads[0], heads[2]) and not torch.equal(batches[0][0], batches[2][0])


@pytest.mark.slow
def test_stage_reports_val_and_holdout_and_writes_curves(prepared, tmp_path):
    enc = fake_pretrain(tmp_path / "pre")
    stage(tmp_path, prepared, "a", enc)
    m = json.loads((tmp_path / "a" / "m.json").read_text())
    assert {"top1", "top5", "holdout_top1", "holdout_top5"} <= set(m) and m["pretrained"] is True
    assert m["variant"] == "pre" and m["seed"] == 0 and m["resumed_from_epoch"] == 0
    rows = (tmp_path / "a" / "c.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    assert header == ["step", "epoch", "holdout_top1", "loss", "lr"]
    steps_per_epoch = 240 // 32  # 300 train images - 60 held out
    assert len(rows) == 1 + 2 * steps_per_epoch
    evaluated = [r.split("\t")[2] for r in rows[1:] if r.split("\t")[2]]
    assert len(evaluated) == 2 and float(evaluated[-1]) == pytest.approx(m["holdout_top1"], abs=1e-6)
    out = tmp_path / "a" / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "meta.json", "model.pth"]
    scratch = stage(tmp_path, prepared, "s", None)
    assert scratch.returncode == 0
    assert json.loads((tmp_path / "s" / "m.json").read_text())["pretrained"] is False


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_model_as_an_unbroken_run(prepared, tmp_path):
    enc = fake_pretrain(tmp_path / "pre")
    stage(tmp_path, prepared, "unbroken", enc, epochs=3)
    proc = stage(tmp_path, prepared, "broken", enc, wait=False, epochs=3)
    sigkill_after_first_checkpoint(proc, tmp_path / "broken" / "resume" / "last.pth", tmp_path / "broken" / "out")
    stage(tmp_path, prepared, "broken", enc, epochs=3)
    m = json.loads((tmp_path / "broken" / "m.json").read_text())
    assert m["resumed_from_epoch"] >= 1  # it continued from the checkpoint: less work than a fresh run
    for name in ("model.pth", "meta.json", "config.json"):
        assert (tmp_path / "broken" / "out" / name).read_bytes() == (tmp_path / "unbroken" / "out" / name).read_bytes()
    assert (tmp_path / "broken" / "c.tsv").read_text() == (tmp_path / "unbroken" / "c.tsv").read_text()
    unbroken = json.loads((tmp_path / "unbroken" / "m.json").read_text())
    assert (m["top1"], m["holdout_top1"]) == (unbroken["top1"], unbroken["holdout_top1"])
    assert not any((tmp_path / "broken" / "resume").iterdir())


def test_bad_input_is_refused_before_compute(prepared, tmp_path):
    enc = fake_pretrain(tmp_path / "pre")
    with pytest.raises(FinetuneError, match="micro-batch.*make it even"):
        finetune(FinetuneConfig(**{**FAST, "batch_size": 33}), SHAPE, prepared, tmp_path / "o", 0)
    with pytest.raises(FinetuneError, match="exceeds the 240 training images"):
        finetune(FinetuneConfig(**{**FAST, "batch_size": 256}), SHAPE, prepared, tmp_path / "o", 0)
    params = write_params(tmp_path / "bad.yaml", finetune={**FAST, "layer_decay": 1.5})
    import subprocess
    import sys

    res = subprocess.run([str(Path(sys.executable).parent / "semmae"), "finetune", "--params", str(params),
                          "--prepared", str(prepared), "--pretrained", str(enc), "--out", "o", "--metrics", "m.json",
                          "--curves", "c.tsv"], cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2 and "finetune.layer_decay" in res.stderr and "1.5" in res.stderr
    assert not (tmp_path / "o").exists()


def test_params_yaml_finetune_section_is_valid():
    from conftest import REPO

    FinetuneConfig(**yaml.safe_load((REPO / "params.yaml").read_text())["finetune"])


def test_whole_file_check_covers_the_finetune_section(tmp_path):
    """`semmae check` (run before every stage) validates finetune and its batch against the train images."""
    from pipeline.config.check import check_params

    path = write_params(tmp_path / "p.yaml", prepare={"train_limit": 500}, finetune={"batch_size": 501})
    assert any("'finetune.batch_size' = 501 exceeds the 500 train images" in e for e in check_params(path).errors)
    write_params(path, finetune={"mixup": -1.0})
    assert any("finetune.mixup" in e for e in check_params(path).errors)


@pytest.mark.slow
def test_two_torchrun_processes_share_the_batch_and_the_evaluation(prepared, tmp_path):
    """Under torchrun each rank trains on its half of the global batch (DDP averages the gradients) and
    evaluates its share of the shards; the counts summed over the ranks give one process's accuracy
    (with a vanishing lr the two runs hold the same model, so their metrics must agree exactly)."""
    import os
    import subprocess
    import sys

    enc = fake_pretrain(tmp_path / "pre")
    binary = Path(sys.executable).parent
    results = []
    for procs in (1, 2):
        name = f"p{procs}"
        params = write_params(tmp_path / f"{name}.yaml", finetune={**FAST, "epochs": 1, "steps_per_epoch": 1,
                                                                   "base_lr": 1e-12, "warmup_epochs": 0.0})  # fmt: skip
        cmd = ["semmae", "finetune", "--params", str(params), "--prepared", str(prepared), "--pretrained", str(enc),
               "--out", f"{name}/out", "--metrics", f"{name}/m.json", "--curves", f"{name}/c.tsv"]  # fmt: skip
        if procs > 1:
            cmd = [str(binary / "torchrun"), "--standalone", f"--nproc_per_node={procs}", "--no-python", *cmd]
        env = {**os.environ, "PATH": f"{binary}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        results.append(json.loads((tmp_path / name / "m.json").read_text()))
    keys = ("top1", "top5", "holdout_top1", "holdout_top5")
    assert [results[0][k] for k in keys] == [results[1][k] for k in keys]
    assert results[1]["steps"] == 1 and 0 < results[1]["top1"] < 1
