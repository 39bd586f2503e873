"""Pretraining figures: exact un-normalisation of reconstructions, visible masks, the figure stage."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import make_part_shards
from pipeline.config.base import resolved_config
from pipeline.config.pretrain import PretrainConfig
from pipeline.data.images import normalize
from pipeline.figures import upscale
from pipeline.mae.figures import (
    FIGURES,
    MASK_COLOUR,
    FigureError,
    draw_pretrain_figures,
    mask_columns,
    masked_view,
    method_label,
    reconstruction_pixels,
)
from pipeline.mae.masking import random_masking
from pipeline.mae.model import build_mae
from pipeline.mae.train import save_state
from stages.cli import app

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16,
        "decoder_depth": 1, "decoder_num_heads": 2, "num_figure_images": 3}  # fmt: skip


def grey_images(n: int = 6, size: int = 16) -> torch.Tensor:
    """Grey ``uint8 [n, 3, S, S]``: flat dark background, flat mid-grey, textured and saturated patches."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (n, size, size)).astype(np.uint8)
    grey[:, :4, :] = 0  # flat black patches (the background of Fashion-MNIST)
    grey[:, 4:8, :8] = 128  # flat mid-grey patches
    grey[:, 8:12, :4] = 255  # flat white
    return torch.from_numpy(np.repeat(grey[:, None], 3, 1))


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_a_perfect_prediction_of_grey_images_is_drawn_grey_and_equal_to_the_input(norm_pix_loss):
    """The prediction that makes the training loss zero (the true normalised patch targets) must come out of
    the figure's un-normalisation (per-patch mean/std, then ImageNet mean/std) as the input pixels."""
    cfg = PretrainConfig(**TINY, norm_pix_loss=norm_pix_loss, loss_target="input")  # MAE's target space
    model = build_mae(cfg)
    images = grey_images()
    x = normalize(images.float() / 255)
    target = model.patchify(x)
    if norm_pix_loss:  # MAE: each patch normalised by the mean/var over all its pixels and channels
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    everything = torch.ones(target.shape[:2])
    assert model.forward_loss(x, target, everything).item() < 1e-10  # it is the loss's own target
    rec = reconstruction_pixels(model, x, target).astype(int)
    off, blue_red = np.abs(rec - images.numpy()).max(), np.abs(rec[:, 2] - rec[:, 0]).max()
    assert off <= 1, f"reconstruction differs from the input by up to {off} levels"
    assert blue_red <= 1 and np.abs(rec[:, 1] - rec[:, 0]).max() <= 1, f"grey drawn in colour: |B-R| up to {blue_red}"
    half = random_masking(len(images), cfg.grid**2, 0.5, torch.Generator().manual_seed(0)).mask
    pasted = reconstruction_pixels(model, x, target, half).astype(int)
    assert np.abs(pasted - images.numpy()).max() <= 1, "reconstruction with the visible patches pasted back"


def test_masked_patches_carry_the_mask_colour_and_visible_patches_are_untouched():
    grid, size = 4, 96  # 24-pixel cells
    image = grey_images(1)[0].numpy()
    mask = np.zeros(grid * grid, np.float32)
    mask[[0, 5, 6, 15]] = 1  # one flat black, one flat grey, one textured, one textured
    view = masked_view(image, mask, grid, size)
    plain = upscale(image, size)
    cells = size // grid
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        cell = view[r * cells:(r + 1) * cells, c * cells:(c + 1) * cells].astype(int)
        exact = (cell == MASK_COLOUR).all(-1)
        if mask[k]:
            assert exact.mean() > 0.2, f"masked cell {k}: only {exact.mean():.0%} in the mask colour"
            # every pixel is tinted: far from grey (a grey garment), magenta's green stays low
            assert (np.minimum(cell[..., 0], cell[..., 2]) - cell[..., 1] >= 60).all(), f"masked cell {k} has grey pixels"
        else:
            assert not exact.any(), f"visible cell {k} has mask-coloured pixels"
            np.testing.assert_array_equal(cell, plain[r * cells:(r + 1) * cells, c * cells:(c + 1) * cells])


def test_random_masking_is_named_mae_and_shows_independent_draws():
    parts = torch.randint(0, 4, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    cfg = PretrainConfig(**TINY, masking="random")
    assert method_label(cfg) == "MAE (random masking)"
    masks, caption = mask_columns(cfg, parts, 4)
    assert caption.startswith("MAE (random masking)") and "independent draws" in caption
    columns = list(masks.values())[:3]
    assert all(not torch.equal(a, b) for i, a in enumerate(columns) for b in columns[i + 1:])
    # then the other strategies on the same images (no block column: TINY's 4x4 grid masks 12 < 16 patches;
    # no attention column: no attention maps given)
    assert list(masks)[3:] == ["vs. semantic alpha=0", "vs. semantic alpha=1"]
    semantic = PretrainConfig(**TINY)
    assert method_label(semantic).startswith("SemMAE (semantic masking, curriculum")
    titles = list(mask_columns(semantic, parts, 4)[0])
    assert titles == ["t=0, alpha=0.00", "t=T/2, alpha=0.25", "t=T, alpha=1.00", "vs. random"]


def test_every_strategy_shows_its_masks_and_the_others_on_the_same_images():
    """Each strategy's own columns, then the other strategies' masks: the attention columns mask exactly the
    most (high) / least (low) attended cells of the given maps, the block column is BEiT's masks of one noise
    draw (whole rectangles of >= block_min_patches), and every column hides exactly L - len_keep patches."""
    gen = torch.Generator().manual_seed(0)
    parts = torch.randint(0, 4, (3, 4, 4), generator=gen)
    attention = torch.rand(3, 4, 4, generator=gen)  # distinct values: no ties
    order = attention.flatten(1).argsort(1, descending=True)  # most attended first
    top12 = torch.zeros(3, 16).scatter_(1, order[:, :12], 1.0)
    bottom12 = torch.zeros(3, 16).scatter_(1, order[:, 4:], 1.0)
    for masking in ("semantic", "random", "block", "attention"):
        cfg = PretrainConfig(**TINY, masking=masking, block_min_patches=4)
        masks, caption = mask_columns(cfg, parts, 4, attention)
        assert caption.startswith(method_label(cfg).split(" (")[0])
        own = {"semantic": 3, "random": 3, "block": 3, "attention": 3}[masking]
        others = [t for t in ("random", "block", "attention high", "semantic alpha=0", "semantic alpha=1")
                  if not t.startswith(masking)]
        assert list(masks)[own:] == [f"vs. {t}" for t in others], masking
        assert all(bool((m.sum(1) == 12).all()) for m in masks.values()), masking
        high = masks["attention high" if masking == "attention" else "vs. attention high"]
        assert torch.equal(high, top12)
        if masking == "attention":
            assert torch.equal(masks["attention low"], bottom12)
            hint = masks["attention hint (run)"]  # the default mode; 4x4: a pool of int(0.1*16) = 1, int(0.1*0.75*16) = 1 revealed
            assert bool((hint.gather(1, order[:, :1]) == 0).all()) and bool((hint.gather(1, order[:, 12:13]) == 1).all())
        block = masks["block draw 1" if masking == "block" else "vs. block"]
        assert not torch.equal(block, masks.get("vs. random", masks.get("random draw 1")))


def pretrain_output(root: Path, **overrides) -> Path:
    """A directory as `semmae pretrain` writes it (config.json, mae.pth), with an untrained model."""
    cfg = PretrainConfig(**{**TINY, **overrides})
    root.mkdir(parents=True)
    save_state(build_mae(cfg), root / "mae.pth")
    (root / "config.json").write_bytes(resolved_config(cfg, "pretrain"))
    return root


def figure_stage(pretrained: Path, shards: Path, out: Path):
    return CliRunner().invoke(app, ["pretrain_figures", "--pretrained", str(pretrained), "--part-shards", str(shards),
                                    "--out", str(out)])  # fmt: skip


def test_stage_draws_both_figures_from_a_pretrain_output_byte_identically(tmp_path):
    shards = make_part_shards(tmp_path / "shards", n_train=8, n_val=4)
    run = pretrain_output(tmp_path / "run", masking="random")
    for out in ("a", "b"):
        res = figure_stage(run, shards, tmp_path / out)
        assert res.exit_code == 0, res.output
    for name in FIGURES:
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes(), f"{name} differs between two runs"
        with Image.open(tmp_path / "a" / name) as png:
            assert png.format == "PNG" and png.size[0] >= 5 * 112
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(FIGURES)  # no temporaries left


def test_missing_or_malformed_run_files_are_named_in_the_error(tmp_path):
    shards = make_part_shards(tmp_path / "shards", n_train=8, n_val=4)
    run = pretrain_output(tmp_path / "run")
    weights = (run / "mae.pth").read_bytes()
    (run / "mae.pth").unlink()
    res = figure_stage(run, shards, tmp_path / "out")
    assert res.exit_code == 2 and f"{run / 'mae.pth'} not found" in res.output
    assert not (tmp_path / "out").exists()
    (run / "mae.pth").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(FigureError, match=r"mae\.pth: not a readable PyTorch weights file"):
        draw_pretrain_figures(run, shards, tmp_path / "out")
    other = pretrain_output(tmp_path / "other", embed_dim=64)
    (run / "mae.pth").write_bytes((other / "mae.pth").read_bytes())
    with pytest.raises(FigureError, match=r"mae\.pth does not fit the MAE described by .*config\.json"):
        draw_pretrain_figures(run, shards, tmp_path / "out")
    (run / "config.json").write_text('{"pretrain": {"embed_dim": "wide"}}')
    with pytest.raises(FigureError, match=r"config\.json: 'pretrain\.embed_dim' = 'wide' is invalid"):
        draw_pretrain_figures(run, shards, tmp_path / "out")
    (run / "config.json").unlink()
    with pytest.raises(FigureError, match=r"config\.json not found"):
        draw_pretrain_figures(run, shards, tmp_path / "out")


@pytest.mark.parametrize("loss_target", ["input", "pixels"])
def test_the_exact_target_is_drawn_as_the_input_for_either_loss_target(loss_target):
    """Whatever the model predicts (its targets in input or in pixel space), the figure draws its exact target
    as the input pixels."""
    model = build_mae(PretrainConfig(**TINY, loss_target=loss_target))
    images = grey_images()
    x = normalize(images.float() / 255)
    target = model.patchify(model.target_images(x))
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert model.forward_loss(x, target, torch.ones(target.shape[:2])).item() < 1e-10
    assert np.abs(reconstruction_pixels(model, x, target).astype(int) - images.numpy()).max() <= 1


def test_a_trained_model_reconstructs_grey_images_grey_with_pixel_targets():
    """On a model trained to reconstruct, grey garments on black come back grey with loss_target: pixels.
    MAE's own target (the normalised input) carries ImageNet's per-channel offsets divided by each patch's
    contrast, which the model cannot know for a masked patch: the same model turns them blue."""
    g = torch.Generator().manual_seed(0)
    grey = torch.zeros(16, 1, 16, 16)
    for i in range(len(grey)):  # a textured grey object on a black background, like Fashion-MNIST
        (t, left), (b, right) = torch.randint(1, 6, (2,), generator=g).tolist(), torch.randint(10, 15, (2,), generator=g).tolist()
        level = torch.randint(80, 230, (1,), generator=g).item()
        grey[i, 0, t:b, left:right] = level + 60 * torch.randn(b - t, right - left, generator=g)
    images = grey.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    x = normalize(images.float() / 255)
    on_object = images.numpy()[:, 0] > 0
    tint = {}
    for loss_target in ("input", "pixels"):
        torch.manual_seed(0)
        model = build_mae(PretrainConfig(**TINY, loss_target=loss_target))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(150):
            loss, _ = model(x, random_masking(len(x), model.num_patches, 0.5, torch.Generator().manual_seed(step)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            _, pred = model(x, random_masking(len(x), model.num_patches, 0.5, torch.Generator().manual_seed(999)))
            rec = reconstruction_pixels(model, x, pred).astype(int)
        error = np.abs(rec - images.numpy()).mean()
        assert error < 35, f"{loss_target}: the model does not reconstruct (mean error {error:.1f} levels)"
        tint[loss_target] = (rec[:, 2] - rec[:, 0])[on_object].mean()  # the signed cast: blue minus red
    assert abs(tint["pixels"]) < 4, f"grey objects reconstruct with a cast of {tint['pixels']:+.1f} levels"
    assert tint["input"] > 10, tint  # MAE's target space: the blue cast, on the same model and images


@pytest.mark.parametrize("masking", ["block", "attention"])
def test_stage_draws_block_and_attention_runs_with_every_strategy_column(tmp_path, masking):
    """The figure stage of a block or attention run, on part shards that hold attention maps: 2 + 3 own + 4
    comparison columns; an attention run given shards without attention maps is refused, naming the fix."""
    shards = make_part_shards(tmp_path / "shards", n_train=8, n_val=4, attention=True)
    run = pretrain_output(tmp_path / "run", masking=masking, block_min_patches=4)
    res = figure_stage(run, shards, tmp_path / "out")
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "out" / "curriculum_masks.png") as png:
        assert png.size[0] >= 9 * 112
    plain = make_part_shards(tmp_path / "plain", n_train=8, n_val=4)
    res = figure_stage(run, plain, tmp_path / "out2")
    if masking == "attention":
        assert res.exit_code != 0 and "no attention maps" in res.output and "export_parts" in res.output
    else:
        assert res.exit_code == 0, res.output  # without attention maps the comparison skips that column
