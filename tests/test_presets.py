"""The presets under configs/: valid, in step with params.yaml, and the ImageNet recipe's models and
derived numbers are what the paper uses (built on the meta device, and run at reduced width)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from pipeline.config.check import check_params
from pipeline.config.pretrain import load_pretrain_config
from pipeline.mae.masking import semantic_masking
from pipeline.mae.train import build_mae
from pipeline.teacher.build import teacher_vit

PRESETS = sorted((REPO / "configs").glob("*.yaml"))
IMAGENET_TRAIN = 1_281_167


def keys(tree, prefix="") -> set[str]:
    out = set()
    for k, v in tree.items():
        out.add(prefix + k)
        if isinstance(v, dict) and prefix + k != "pretrain.variants":
            out |= keys(v, prefix + k + ".")
    return out


def staged(preset: Path, tmp_path: Path) -> Path:
    """The preset as params.yaml in a scratch directory, with a placeholder at its teacher checkpoint path."""
    params = yaml.safe_load(preset.read_text())
    ckpt = tmp_path / params["teacher"]["checkpoint"]
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"")  # check_params only needs the file to exist
    shutil.copy(preset, tmp_path / "params.yaml")
    return tmp_path / "params.yaml"


def test_presets_exist_and_have_every_key_of_params_yaml():
    assert {p.name for p in PRESETS} >= {"imagenet-vitb16.yaml", "fmnist-full.yaml"}
    default = keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    for preset in PRESETS:
        assert keys(yaml.safe_load(preset.read_text())) == default, preset.name


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_passes_every_stage_config_and_the_cross_stage_checks(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = check_params(staged(preset, tmp_path))
    assert report.errors == []
    assert set(report.configs) == {"prepare", "teacher", "extract", "parts", "export_parts", "linprobe"}
    assert report.runs  # every variant x seed validated


def test_imagenet_preset_is_the_papers_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = check_params(staged(REPO / "configs" / "imagenet-vitb16.yaml", tmp_path))
    c, runs = report.configs, report.runs
    assert sorted(runs) == ["random-0", "semantic-0"]
    mae = runs["semantic-0"]
    assert (mae.arch, mae.img_size, mae.patch_size, mae.embed_dim, mae.depth, mae.num_heads) == (
        "vit_base_patch16_224", 224, 16, 768, 12, 12)
    assert (mae.decoder_embed_dim, mae.decoder_depth, mae.decoder_num_heads) == (512, 8, 16)
    assert (mae.epochs, mae.warmup_epochs, mae.batch_size, mae.mask_ratio, mae.gamma) == (800, 40, 4096, 0.75, 2.0)
    assert mae.peak_lr() == pytest.approx(2.4e-3)  # 1.5e-4 x 4096 / 256
    steps = IMAGENET_TRAIN // mae.batch_size
    assert steps == 312 and steps * mae.epochs == 249_600
    assert c["linprobe"].epochs == 90 and c["linprobe"].batch_size == 16384
    assert c["linprobe"].peak_lr() == pytest.approx(6.4)  # 0.1 x 16384 / 256
    assert c["parts"].num_parts == 6 and c["export_parts"].grid == 14 == mae.grid
    assert c["prepare"].source == "imagefolder" and c["prepare"].resize == 256

    # the models at full size, without memory: the meta device
    with torch.device("meta"):
        vit = teacher_vit(c["teacher"])
        model = build_mae(mae)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(vit) == pytest.approx(21.7e6, rel=0.01)  # ViT-S/16
    assert count(model.encoder) == pytest.approx(85.8e6, rel=0.01)  # ViT-B/16 without a head
    assert count(model) == pytest.approx(111.9e6, rel=0.01)  # + MAE's 512-d x 8 decoder
    assert vit.patch_embed.grid_size == (14, 14) and model.encoder.patch_embed.grid_size == (14, 14)


def test_imagenet_preset_runs_at_reduced_width(tmp_path, monkeypatch):
    """The recipe's code path at 224 px: 196 patches, semantic masking of 6 parts, a training step."""
    monkeypatch.chdir(tmp_path)
    params = staged(REPO / "configs" / "imagenet-vitb16.yaml", tmp_path)
    full = load_pretrain_config(params, "semantic", 0)
    small = full.model_copy(update={"embed_dim": 48, "depth": 1, "num_heads": 3, "decoder_embed_dim": 32,
                                    "decoder_depth": 1, "decoder_num_heads": 2})  # fmt: skip
    model = build_mae(small)
    x = torch.randn(2, 3, 224, 224)
    parts = torch.randint(0, 6, (2, 196), generator=torch.Generator().manual_seed(0))
    masking = semantic_masking(parts, full.mask_ratio, 0.5, 6, torch.Generator().manual_seed(1))
    assert masking.len_keep == 49 and masking.mask.sum().item() == 2 * 147
    loss, pred = model(x, masking)
    assert pred.shape == (2, 196, 16 * 16 * 3) and math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.blocks.parameters())


def test_fmnist_full_preset_has_three_seeds_per_variant_on_all_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = check_params(staged(REPO / "configs" / "fmnist-full.yaml", tmp_path))
    assert sorted(report.runs) == [f"{v}-{s}" for v in ("random", "semantic") for s in (0, 1, 2)]
    prep = report.configs["prepare"]
    assert prep.train_limit is None and prep.val_limit is None
    run = report.runs["semantic-0"]
    assert run.loader_streams is not None and 60_000 // prep.shard_size >= run.loader_streams
