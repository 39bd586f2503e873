"""The presets under configs/: valid, in step with params.yaml, every value of the ImageNet recipe equal to
the published one (PUBLISHED names the source of each), and its models and derived numbers what the papers
use (built on the meta device, and run at reduced width)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import numpy as np
import torch
import yaml
from PIL import Image

from conftest import REPO
from pipeline.config.base import load_stage_config
from pipeline.config.check import check_params
from pipeline.config.finetune import FinetuneConfig
from pipeline.config.pretrain import load_pretrain_config
from pipeline.data.images import to_square
from pipeline.mae.data import joint_crop, sample_crop
from pipeline.mae.masking import semantic_masking
from pipeline.mae.train import build_mae
from pipeline.teacher.build import teacher_vit

PRESETS = sorted((REPO / "configs").glob("*.yaml"))
IMAGENET_TRAIN = 1_281_167

# Where each published value comes from. MAE: He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"
# (CVPR), appendix A.1, whose settings tables are Table 8 (pre-training), Table 9 (end-to-end fine-tuning) and
# Table 10 (linear probing); its official code (github.com/facebookresearch/mae) fixes what the tables leave
# open. SemMAE: Li et al. 2022, "SemMAE: Semantic-Guided Masking for Learning Masked Autoencoders" (NeurIPS),
# and its official code (github.com/ucasligang/SemMAE). iBOT: Zhou et al. 2022 (ICLR), its released ViT-S/16.
MAE_PT = "MAE, He et al. 2022, App. A.1 'Pre-training', Table 8"
MAE_FT = "MAE, He et al. 2022, App. A.1 'End-to-end fine-tuning', Table 9"
MAE_LP = "MAE, He et al. 2022, App. A.1 'Linear probing', Table 10"
MAE_ARCH = "MAE, He et al. 2022, App. A.1 'ViT architecture' (ViT-B/16 of Dosovitskiy et al. 2021; decoder 512-d x 8)"
MAE_PT_CODE = "MAE's code, main_pretrain.py"
MAE_FT_CODE = "MAE's code, main_finetune.py and util/datasets.py"
MAE_LP_CODE = "MAE's code, main_linprobe.py and util/lars.py"
SEMMAE = "SemMAE, Li et al. NeurIPS 2022"
SEMMAE_CODE = "SemMAE's code, main_pretrain_setting3.py (fixed 224-px centre crops with their part masks, flip only)"
IBOT = "SemMAE, Li et al. NeurIPS 2022: iBOT's released ViT-S/16 (Zhou et al. 2022) as the teacher"

PUBLISHED: dict[tuple[str, ...], tuple[object, str]] = {
    # linear probe: frozen encoder, BatchNorm (affine off) + linear head, LARS, cosine after warm-up
    ("linprobe", "mode"): ("online", f"{MAE_LP}: features are not cached, each epoch sees new augmented crops"),
    ("linprobe", "augment"): (True, f"{MAE_LP}: RandomResizedCrop + horizontal flip"),
    ("linprobe", "crop_scale"): ([0.08, 1.0], f"{MAE_LP_CODE}: RandomResizedCrop's default area range"),
    ("linprobe", "epochs"): (90, MAE_LP),
    ("linprobe", "warmup_epochs"): (10, MAE_LP),
    ("linprobe", "batch_size"): (16384, MAE_LP),
    ("linprobe", "base_lr"): (0.1, f"{MAE_LP}: lr = base_lr x batch / 256"),
    ("linprobe", "min_lr"): (0.0, MAE_LP_CODE),
    ("linprobe", "weight_decay"): (0.0, MAE_LP),
    ("linprobe", "momentum"): (0.9, MAE_LP),
    ("linprobe", "trust_coefficient"): (0.001, MAE_LP_CODE),
    ("linprobe", "eval_crop_pct"): (0.875, f"{MAE_LP_CODE}: Resize(256, bicubic) + CenterCrop(224)"),
    # end-to-end fine-tuning of ViT-B/16
    ("finetune", "epochs"): (100, MAE_FT),
    ("finetune", "warmup_epochs"): (5, MAE_FT),
    ("finetune", "batch_size"): (1024, MAE_FT),
    ("finetune", "base_lr"): (5e-4, f"{MAE_FT}: ViT-B's lr = base_lr x batch / 256"),
    ("finetune", "min_lr"): (1e-6, MAE_FT_CODE),
    ("finetune", "betas"): ([0.9, 0.999], MAE_FT),
    ("finetune", "weight_decay"): (0.05, MAE_FT),
    ("finetune", "layer_decay"): (0.65, f"{MAE_FT}: ViT-B's layer-wise lr decay"),
    ("finetune", "drop_path"): (0.1, f"{MAE_FT}: ViT-B's drop path"),
    ("finetune", "clip_grad"): (None, MAE_FT_CODE),
    ("finetune", "auto_augment"): ("rand-m9-mstd0.5-inc1", f"{MAE_FT}: RandAug (9, 0.5)"),
    ("finetune", "label_smoothing"): (0.1, MAE_FT),
    ("finetune", "mixup"): (0.8, MAE_FT),
    ("finetune", "cutmix"): (1.0, MAE_FT),
    ("finetune", "mixup_prob"): (1.0, MAE_FT_CODE),
    ("finetune", "mixup_switch_prob"): (0.5, MAE_FT_CODE),
    ("finetune", "random_erasing"): (0.25, MAE_FT),
    ("finetune", "crop_scale"): ([0.08, 1.0], f"{MAE_FT_CODE}: timm create_transform's RandomResizedCrop"),
    ("finetune", "hflip"): (0.5, MAE_FT_CODE),
    ("finetune", "eval_crop_pct"): (0.875, f"{MAE_FT_CODE}: Resize(256, bicubic) + CenterCrop(224)"),
    # pretraining: MAE's ViT-B/16 recipe, SemMAE's masking and data
    ("pretrain", "common", "arch"): ("vit_base_patch16_224", MAE_ARCH),
    ("pretrain", "common", "img_size"): (224, MAE_ARCH),
    ("pretrain", "common", "patch_size"): (16, MAE_ARCH),
    ("pretrain", "common", "embed_dim"): (768, MAE_ARCH),
    ("pretrain", "common", "depth"): (12, MAE_ARCH),
    ("pretrain", "common", "num_heads"): (12, MAE_ARCH),
    ("pretrain", "common", "decoder_embed_dim"): (512, MAE_ARCH),
    ("pretrain", "common", "decoder_depth"): (8, MAE_ARCH),
    ("pretrain", "common", "decoder_num_heads"): (16, f"{MAE_PT_CODE} (models_mae.py, mae_vit_base_patch16)"),
    ("pretrain", "common", "norm_pix_loss"): (True, f"{MAE_PT}: normalised pixels as targets"),
    ("pretrain", "common", "loss_target"): ("input", f"{MAE_PT_CODE}: targets are patches of the normalised input"),
    ("pretrain", "common", "mask_ratio"): (0.75, MAE_PT),
    ("pretrain", "common", "epochs"): (800, f"{MAE_PT}; {SEMMAE}: 800 epochs"),
    ("pretrain", "common", "warmup_epochs"): (40, MAE_PT),
    ("pretrain", "common", "batch_size"): (4096, MAE_PT),
    ("pretrain", "common", "base_lr"): (1.5e-4, f"{MAE_PT}: lr = base_lr x batch / 256"),
    ("pretrain", "common", "min_lr"): (0.0, MAE_PT_CODE),
    ("pretrain", "common", "weight_decay"): (0.05, MAE_PT),
    ("pretrain", "common", "betas"): ([0.9, 0.95], MAE_PT),
    ("pretrain", "common", "clip_grad"): (None, MAE_PT_CODE),
    ("pretrain", "common", "crop_scale"): ([1.0, 1.0], SEMMAE_CODE),
    ("pretrain", "common", "crop_ratio"): ([1.0, 1.0], SEMMAE_CODE),
    ("pretrain", "common", "hflip"): (0.5, SEMMAE_CODE),
    ("pretrain", "common", "masking"): ("semantic", SEMMAE),
    ("pretrain", "common", "schedule"): ("curriculum", f"{SEMMAE}: easy-to-hard masking"),
    ("pretrain", "common", "gamma"): (2.0, f"{SEMMAE}: the best gamma of the curriculum ablation"),
    ("pretrain", "common", "curriculum_unit"): ("epoch", "SemMAE's code, engine_pretrain_setting3.py: (epoch+1)/800"),
    ("pretrain", "variants", "semantic", "masking"): ("semantic", SEMMAE),
    ("pretrain", "variants", "random", "masking"): ("random", f"{MAE_PT}: random masking, the baseline"),
    # the part source: iBOT ViT-S/16 features, N = 6 parts
    ("teacher", "init"): ("checkpoint", IBOT),
    ("teacher", "arch"): ("vit_small_patch16_224", IBOT),
    ("teacher", "img_size"): (224, IBOT),
    ("teacher", "patch_size"): (16, IBOT),
    ("teacher", "embed_dim"): (384, IBOT),
    ("teacher", "depth"): (12, IBOT),
    ("teacher", "num_heads"): (6, IBOT),
    ("parts", "num_parts"): (6, f"{SEMMAE}: N = 6 parts"),
    ("export_parts", "grid"): (14, f"{MAE_ARCH}: 224 / 16 = 14 patches a side"),
}


def published_mismatches(preset: dict) -> list[str]:
    """One line per PUBLISHED key whose preset value differs: key, preset value, published value, source.
    A list of probe lrs (a grid chosen on the holdout split) agrees when it contains the published one."""
    wrong = []
    for path, (published, source) in PUBLISHED.items():
        key, node = ".".join(path), preset
        for part in path:
            if not isinstance(node, dict) or part not in node:
                wrong.append(f"{key}: missing from the preset; published {published!r} ({source})")
                break
            node = node[part]
        else:
            if path == ("linprobe", "base_lr") and isinstance(node, list):
                ok = any(_equal(v, published) for v in node)
            else:
                ok = _equal(node, published)
            if not ok:
                wrong.append(f"{key}: preset {node!r}, published {published!r} ({source})")
    return wrong


def _equal(value, published) -> bool:
    if isinstance(published, list):
        return isinstance(value, list) and len(value) == len(published) and all(map(_equal, value, published))
    if isinstance(published, bool) or published is None or isinstance(published, str):
        return value is published or (isinstance(published, str) and value == published)
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isclose(value, published)


def keys(tree, prefix="") -> set[str]:
    out = set()
    for k, v in tree.items():
        out.add(prefix + k)
        if isinstance(v, dict) and prefix + k not in ("pretrain.variants", "part_sources.sources"):  # names, not keys
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
    assert set(report.configs) >= {"prepare", "teacher", "extract", "parts", "export_parts", "linprobe"}
    assert report.runs  # every variant x seed validated
    load_stage_config(FinetuneConfig, tmp_path / "params.yaml", "finetune")  # raises ConfigError naming the key


def test_imagenet_preset_values_are_the_published_ones():
    preset = yaml.safe_load((REPO / "configs" / "imagenet-vitb16.yaml").read_text())
    wrong = published_mismatches(preset)
    assert not wrong, "configs/imagenet-vitb16.yaml departs from the papers:\n" + "\n".join(wrong)


def test_published_table_catches_a_changed_value_a_missing_key_and_a_grid_without_the_published_lr():
    preset = yaml.safe_load((REPO / "configs" / "imagenet-vitb16.yaml").read_text())
    preset["finetune"]["layer_decay"] = 0.75
    preset["linprobe"]["augment"] = 1  # equal to True in Python, but not the published value
    del preset["pretrain"]["common"]["gamma"]
    assert published_mismatches(preset) == [
        f"linprobe.augment: preset 1, published True ({PUBLISHED['linprobe', 'augment'][1]})",
        f"finetune.layer_decay: preset 0.75, published 0.65 ({PUBLISHED['finetune', 'layer_decay'][1]})",
        "pretrain.common.gamma: missing from the preset; published 2.0 "
        f"({PUBLISHED['pretrain', 'common', 'gamma'][1]})",
    ]
    for grid, ok in (([0.05, 0.1, 0.2], True), ([0.05, 0.2], False)):
        preset = yaml.safe_load((REPO / "configs" / "imagenet-vitb16.yaml").read_text())
        preset["linprobe"]["base_lr"] = grid
        assert (published_mismatches(preset) == []) is ok, grid


@pytest.mark.parametrize("size", [(341, 256), (256, 384), (333, 257)])
def test_imagenet_preset_pretrains_on_the_square_export_parts_mapped(size):
    """SemMAE's data: crop_scale = crop_ratio = [1, 1] gives the whole centred square that export_parts
    computed the part map for (to_square), with that map unchanged, or flipped with the image."""
    common = yaml.safe_load((REPO / "configs" / "imagenet-vitb16.yaml").read_text())["pretrain"]["common"]
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = Image.fromarray(np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8))
    parts = np.random.default_rng(0).integers(0, 6, (14, 14), dtype=np.uint8)
    crop = sample_crop(min(w, h), common["crop_scale"], common["crop_ratio"], np.random.default_rng(1))
    assert crop == (0.0, 0.0, min(w, h), min(w, h))
    for flip in (False, True):
        x, p = joint_crop(img, parts, common["img_size"], 14, crop, flip)
        assert np.array_equal(p, parts[:, ::-1] if flip else parts)
        square = to_square(img, common["img_size"])  # what export_parts fed the teacher
        diff = np.abs(x.astype(int) - (square[:, :, ::-1] if flip else square).astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 8  # the same pixels, up to sub-pixel resampling


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
    steps = (IMAGENET_TRAIN - c["prepare"].holdout_size) // mae.batch_size  # the holdout split is never trained on
    assert steps == 310 and steps * mae.epochs == 248_000  # MAE, on all 1,281,167 images: 312 and 249,600
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
    assert prep.holdout_size == 5000  # 500 per class, never trained on
    assert run.loader_streams is not None and (60_000 - prep.holdout_size) // prep.shard_size >= run.loader_streams


def flat(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_study_preset_is_the_default_with_more_seeds_and_longer_training():
    """The study shares every stage upstream of pretraining with the embedded default (restored from a shared
    DVC cache, not rerun): only the declared keys may differ, and it has >= 3 seeds per variant."""
    default = flat(yaml.safe_load((REPO / "params.yaml").read_text()))
    study = flat(yaml.safe_load((REPO / "configs" / "fmnist-study.yaml").read_text()))
    changed = {k for k in default if default[k] != study[k]}
    assert changed == {"pretrain.seeds", "pretrain.common.epochs", "finetune.epochs", "finetune.warmup_epochs"}
    assert len(study["pretrain.seeds"]) >= 3 and {"semantic", "random"} <= set(
        yaml.safe_load((REPO / "configs" / "fmnist-study.yaml").read_text())["pretrain"]["variants"])


def test_the_strategies_preset_is_the_default_with_seeds_and_the_four_strategies():
    """The four-way comparison reuses everything upstream of pretraining (and the default's seed-0 runs) from a
    shared DVC cache: only the seeds and the variants differ, and each strategy has a variant."""
    default = flat(yaml.safe_load((REPO / "params.yaml").read_text()))
    preset = yaml.safe_load((REPO / "configs" / "fmnist-strategies.yaml").read_text())
    strategies = flat(preset)
    changed = {k for k in default if default[k] != strategies[k]}
    added = set(strategies) - set(default)
    assert changed == {"pretrain.seeds"} and len(strategies["pretrain.seeds"]) >= 3
    assert added == {"pretrain.variants.block.masking", "pretrain.variants.attention.masking"}
    masking = {over["masking"] for over in preset["pretrain"]["variants"].values()}
    assert masking == {"semantic", "random", "block", "attention"}


def test_the_synthetic_parts_preset_is_the_default_on_synthetic_parts_with_seeds():
    """The synthetic-parts preset changes only the image source, the seeds and the part sources it compares:
    every other setting (the teacher, the part learner, pretraining, the probes) is the default's, so its numbers
    read next to the default's; the sources are the learner's other token form, the three references and the true parts."""
    default = yaml.safe_load((REPO / "params.yaml").read_text())
    preset = yaml.safe_load((REPO / "configs" / "synthetic-parts.yaml").read_text())
    sources = preset["part_sources"].pop("sources")
    assert default["part_sources"].pop("sources") == {}
    default, synthetic = flat(default), flat(preset)
    assert set(synthetic) == set(default)
    changed = {k for k in default if default[k] != synthetic[k]}
    assert changed == {"prepare.source", "pretrain.seeds"}
    assert synthetic["prepare.source"] == "synthetic_parts" and len(synthetic["pretrain.seeds"]) >= 3
    assert sources == {"channel_grouping": {"tokens": "channel_grouping"}, "kmeans": {"method": "kmeans"},
                       "attention_heads": {"method": "attention_heads"}, "random_teacher": {"method": "random_teacher"},
                       "ground_truth": {"method": "ground_truth"}}
