"""Pretraining figures: reconstructions of fixed validation images, and the masks the run trains with.

:func:`draw_pretrain_figures` draws them from a finished run alone: the run directory's resolved
``config.json`` rebuilds the MAE, ``mae.pth`` fills it, and the part shards give the first
``num_figure_images`` validation images and their part maps. Everything runs on the CPU with seeded
mask draws, so the same inputs give byte-identical PNGs.

Masked patches are drawn with a magenta tint and magenta hatching (:data:`MASK_COLOUR`), which no grey
or natural image cell is mistaken for.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from pipeline.config.base import format_error
from pipeline.config.pretrain import PretrainConfig
from pipeline.data.images import IMAGENET_MEAN, IMAGENET_STD, normalize
from pipeline.data.shards import PARTS_FORMAT, read_index, shard_entries
from pipeline.errors import PipelineError
from pipeline.figures import overlay, render_grid, upscale
from pipeline.io import atomic_write_bytes, file_sha256
from pipeline.mae.data import fixed_images
from pipeline.mae.masking import Masking, curriculum_alpha
from pipeline.mae.strategies import make_masking
from pipeline.mae.model import MaskedAutoencoder, build_mae

__all__ = ["FigureError", "MASK_COLOUR", "FIGURES", "method_label", "masked_view", "reconstruction_pixels",
           "reconstruction_figure", "curriculum_figure", "mask_columns", "render_pretrain_figures",
           "load_pretrained", "draw_pretrain_figures"]  # fmt: skip

log = logging.getLogger(__name__)

MASK_COLOUR = (255, 0, 255)  # magenta: masked patches (tint + hatching)
FIGURES = ("reconstruction.png", "curriculum_masks.png")
_TINT = 0.45  # share of MASK_COLOUR blended into a masked patch between the hatching lines
_HATCH = 7  # hatching period in pixels (a diagonal line 2 pixels wide every _HATCH pixels)


class FigureError(PipelineError):
    """A pretrain output or part shard set the figures cannot be drawn from; the message names the file."""


def cell_size(grid: int, target: int = 112) -> int:
    """The cell side near ``target`` pixels that is a multiple of ``grid``: every patch is a square block."""
    return grid * max(1, -(-target // grid))


def _generator(device: torch.device, seed: int, *stream: int) -> torch.Generator:
    """A generator for the figures' mask draw ``stream`` of run ``seed`` (the same draw every time)."""
    for s in stream:
        seed = (seed * 1_000_003 + s) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def _masking(cfg: PretrainConfig, parts: torch.Tensor, alpha: float, num_parts: int, generator: torch.Generator,
             attention: Optional[torch.Tensor] = None) -> Masking:  # fmt: skip
    """The masking ``cfg.masking`` trains with, of images with part maps ``parts [B, G, G]`` (semantic: at
    ``alpha``) and teacher attention maps ``attention [B, G, G]`` (attention masking), drawn from ``generator``."""
    guide = attention.flatten(1) if cfg.masking == "attention" else None
    return make_masking(cfg, parts, alpha, num_parts, generator, guide=guide)


def method_label(cfg: PretrainConfig) -> str:
    """How figures name the run's method: the baseline is "MAE (random masking)", not a random encoder."""
    if cfg.masking == "random":
        return "MAE (random masking)"
    if cfg.masking == "block":
        return f"BEiT (block masking, blocks >= {cfg.block_min_patches} patches)"
    if cfg.masking == "attention":
        hint = f", hints from the top {cfg.hint_share:.0%}" if cfg.attention_mode == "hint" else ""
        return f"AttMask (attention masking, {cfg.attention_mode}{hint})"
    schedule = {"curriculum": f"curriculum alpha=(t/T)^{cfg.gamma:g}", "reversed": f"reversed alpha=1-(t/T)^{cfg.gamma:g}",
                "fixed": f"fixed alpha={cfg.alpha:g}"}[cfg.schedule]  # fmt: skip
    return f"SemMAE (semantic masking, {schedule})"


def masked_view(image: np.ndarray, mask: np.ndarray, grid: int, size: Optional[int] = None) -> np.ndarray:
    """``uint8 [3, S, S]`` as ``[size, size, 3]`` (nearest), the patches where ``mask [L]`` = 1 tinted and
    hatched in :data:`MASK_COLOUR`; visible patches are the image's pixels unchanged."""
    size = size or cell_size(grid)
    img = upscale(image, size).copy()
    cells = mask.reshape(grid, grid).astype(bool)
    covered = upscale(np.repeat(cells[None].astype(np.uint8) * 255, 3, 0), size)[..., 0] > 0
    colour = np.array(MASK_COLOUR, np.float32)
    img[covered] = np.round((1 - _TINT) * img[covered] + _TINT * colour).astype(np.uint8)
    y, x = np.mgrid[:size, :size]
    img[covered & ((x + y) % _HATCH < 2)] = MASK_COLOUR
    return img


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised ``[B, 3, S, S]`` -> ``uint8`` pixels (the inverse of :func:`normalize`)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x.float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def reconstruction_pixels(model: MaskedAutoencoder, x: torch.Tensor, pred: torch.Tensor,
                          mask: Optional[torch.Tensor] = None) -> np.ndarray:  # fmt: skip
    """``uint8 [B, 3, S, S]`` of the prediction ``pred [B, L, p*p*3]`` for normalised images ``x``: with
    ``norm_pix_loss`` each patch is un-normalised with its own target's mean and std (as MAE shows it),
    then the ImageNet normalisation is undone; where ``mask`` is 0 the input patch is pasted back."""
    return _to_uint8(model.reconstruct(x, pred, mask))


@torch.no_grad()
def reconstruction_figure(model: MaskedAutoencoder, cfg: PretrainConfig, images: torch.Tensor, parts: torch.Tensor,
                          masking: Masking, alpha: float) -> bytes:  # fmt: skip
    """PNG: per image, the image, its part map, the masked input, the reconstruction, and the
    reconstruction with the visible patches pasted back."""
    device = next(model.parameters()).device
    x = normalize(images.to(device).float() / 255)
    _, pred = model(x, masking)
    rec = reconstruction_pixels(model, x, pred)
    pasted = reconstruction_pixels(model, x, pred, masking.mask)
    mask = masking.mask.cpu().numpy()
    size = cell_size(cfg.grid)
    bicubic = Image.Resampling.BICUBIC
    rows = [[upscale(images[i].numpy(), size, bicubic), overlay(images[i].numpy(), parts[i].numpy(), size),
             masked_view(images[i].numpy(), mask[i], cfg.grid, size), upscale(rec[i], size, bicubic),
             upscale(pasted[i], size, bicubic)] for i in range(len(images))]  # fmt: skip
    at = f" (the masking of t=T, alpha={alpha:.2f})" if cfg.masking == "semantic" else ""
    caption = (f"{method_label(cfg)}, seed {cfg.seed}: reconstructions of {len(images)} validation images, "
               f"{cfg.mask_ratio:.0%} of the patches masked{at}; magenta = masked patch")  # fmt: skip
    if cfg.norm_pix_loss:
        caption += ". Each masked patch is un-normalised with its true mean and std (norm_pix_loss)"
        if cfg.loss_target == "input" and bool((images == images[:, :1]).all()):
            caption += ("; the inputs are grey, so any tint is the model's prediction: a grey patch's target carries "
                        "ImageNet's per-channel offsets divided by the patch's contrast (loss_target: pixels avoids it)")  # fmt: skip
    return render_grid(rows, ["image", "part map", "masked input", "reconstruction", "reconstruction + visible"],
                       caption)  # fmt: skip


def curriculum_figure(cfg: PretrainConfig, images: torch.Tensor, parts: torch.Tensor, masks: dict[str, torch.Tensor],
                      caption: str) -> bytes:  # fmt: skip
    """PNG: per image, the image, its part map, then the masks of ``masks`` (column title -> ``[B, L]``)."""
    size = cell_size(cfg.grid)
    rows = [[upscale(images[i].numpy(), size, Image.Resampling.BICUBIC), overlay(images[i].numpy(), parts[i].numpy(), size)]
            + [masked_view(images[i].numpy(), m[i].cpu().numpy(), cfg.grid, size) for m in masks.values()]
            for i in range(len(images))]  # fmt: skip
    return render_grid(rows, ["image", "part map", *masks], caption)


def mask_columns(cfg: PretrainConfig, parts: torch.Tensor, num_parts: int,
                 attention: Optional[torch.Tensor] = None) -> tuple[dict[str, torch.Tensor], str]:  # fmt: skip
    """The curriculum figure's mask columns and its caption: first the run's own masks, then every other
    strategy's masks of the same images, for comparison.

    The run's own: semantic masking at t = 0, T/2 and T of the schedule, from one noise draw, so the columns
    differ by alpha alone; random and block masking have no schedule (masks do not depend on t), so three
    independent draws, which show what changes from one step to the next; attention masking its three modes
    (high, low, hint; the run's mode is marked). The comparison columns come from one further noise draw
    (stream 3) shared by all of them: random, BEiT block, AttMask high (when the shards hold attention maps,
    i.e. ``attention`` is given) and semantic at alpha = 0 and 1.
    """
    device = parts.device
    run = method_label(cfg)
    masks: dict[str, torch.Tensor] = {}
    if cfg.masking in ("random", "block"):
        for k in (1, 2, 3):
            draw = _generator(device, cfg.seed, 2, k)
            masks[f"{cfg.masking} draw {k}"] = _masking(cfg, parts, 0.0, num_parts, draw).mask
        own = (f"three independent draws of the run's masks ({cfg.mask_ratio:.0%} of the patches; they do not "
               "change during training)")
    elif cfg.masking == "attention":
        for mode in ("high", "low", "hint"):
            other = cfg.model_copy(update={"attention_mode": mode})
            title = f"attention {mode}" + (" (run)" if mode == cfg.attention_mode else "")
            masks[title] = _masking(other, parts, 0.0, num_parts, _generator(device, cfg.seed, 2), attention).mask
        own = "the three attention modes of AttMask on the teacher's attention (the run's mode marked)"
    else:
        for name, t in (("t=0", 0.0), ("t=T/2", 0.5), ("t=T", 1.0)):
            a = curriculum_alpha(t, cfg.schedule, cfg.gamma, cfg.alpha)
            masks[f"{name}, alpha={a:.2f}"] = _masking(cfg, parts, a, num_parts, _generator(device, cfg.seed, 2)).mask
        own = ("masks at the start, middle and end of training (one noise draw, so the columns differ by alpha "
               "alone: 0 = a share of every part, 1 = whole parts)")  # fmt: skip
    others = [("random", {"masking": "random"}, 0.0), ("block", {"masking": "block"}, 0.0)]
    if attention is not None:
        others.append(("attention high", {"masking": "attention", "attention_mode": "high"}, 0.0))
    others += [("semantic alpha=0", {"masking": "semantic"}, 0.0), ("semantic alpha=1", {"masking": "semantic"}, 1.0)]
    compared = []
    for title, update, a in others:
        if update["masking"] == cfg.masking:
            continue  # the run's own strategy is already shown
        masked = cfg.grid**2 - int(cfg.grid**2 * (1 - cfg.mask_ratio))
        if update["masking"] == "block" and cfg.block_min_patches > masked:
            continue  # the run's block_min_patches (unused by its own strategy) exceeds the masked count: no column
        other = cfg.model_copy(update=update)
        masks[f"vs. {title}"] = _masking(other, parts, a, num_parts, _generator(device, cfg.seed, 3), attention).mask
        compared.append(title)
    missing = "" if attention is not None else " (no attention column: these part shards hold no attention maps)"
    caption = (f"{run}, seed {cfg.seed}: {own}; then, for comparison, the masks of {', '.join(compared)} on the "
               f"same images (one shared noise draw){missing}; magenta = masked patch")  # fmt: skip
    return masks, caption


def render_pretrain_figures(model: MaskedAutoencoder, cfg: PretrainConfig, num_parts: int,
                            part_shards: str | Path) -> dict[str, bytes]:  # fmt: skip
    """``{file name: PNG bytes}`` of :data:`FIGURES` for the first ``num_figure_images`` validation images
    (``model`` is put in eval mode)."""
    skip = cfg.on_corrupt == "skip"
    val = [e.path for e in shard_entries(part_shards, "val", PARTS_FORMAT, url=cfg.shards_url, check_sizes=not skip)]
    with_attention = "attention" in read_index(part_shards, PARTS_FORMAT)
    if cfg.masking == "attention" and not with_attention:
        raise FigureError(f"{part_shards}/index.json: the run uses attention masking but these part shards hold no "
                          "attention maps: pass the part shards it was trained on, or rerun export_parts")  # fmt: skip
    loaded = fixed_images(val, cfg.num_figure_images, num_parts, cfg.img_size, cfg.grid, skip=skip,
                          with_attention=with_attention)  # fmt: skip
    images, parts = loaded[0], loaded[1]
    device = next(model.parameters()).device
    parts_d = parts.to(device)
    attention = loaded[2].to(device) if with_attention else None
    alpha = curriculum_alpha(1.0, cfg.schedule, cfg.gamma, cfg.alpha) if cfg.masking == "semantic" else 0.0
    masking = _masking(cfg, parts_d, alpha, num_parts, _generator(device, cfg.seed, 1), attention)
    reconstruction = reconstruction_figure(model.eval(), cfg, images, parts, masking, alpha)
    masks, caption = mask_columns(cfg, parts_d, num_parts, attention)
    return {"reconstruction.png": reconstruction, "curriculum_masks.png": curriculum_figure(cfg, images, parts, masks, caption)}


def _read_config(path: Path) -> PretrainConfig:
    if not path.is_file():
        raise FigureError(f"{path} not found: --pretrained must be an output directory of `semmae pretrain` "
                          "(config.json, mae.pth); run that stage first")  # fmt: skip
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FigureError(f"{path}: not valid JSON ({exc}); rerun `semmae pretrain` to rewrite it") from None
    if not isinstance(data, dict) or not isinstance(data.get("pretrain"), dict):
        raise FigureError(f"{path}: expected {{'pretrain': {{...}}}} as `semmae pretrain` writes it; rerun that stage")
    try:
        return PretrainConfig.model_validate(data["pretrain"])
    except ValidationError as exc:
        lines = [format_error(path, "pretrain", PretrainConfig, e) for e in exc.errors()]
        raise FigureError("\n".join(lines) + "\n(the run was written by another version of the code? rerun "
                          "`semmae pretrain`)") from None  # fmt: skip


def _state_mismatch(expected: dict[str, torch.Tensor], given: dict) -> Optional[str]:
    """What keeps ``given`` from loading into a model whose state dict is ``expected`` (None: nothing)."""
    missing = [k for k in expected if k not in given]
    unexpected = [str(k) for k in given if k not in expected]
    not_tensors = [k for k in expected if k in given and not isinstance(given[k], torch.Tensor)]
    shapes = [k for k in expected if isinstance(given.get(k), torch.Tensor) and given[k].shape != expected[k].shape]
    out = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("not tensors", not_tensors)):
        if keys:
            out.append(f"{len(keys)} {what} key(s), e.g. {keys[0]!r}")
    if shapes:
        k = shapes[0]
        out.append(f"{len(shapes)} of other shape, e.g. {k!r} {tuple(given[k].shape)} where the config gives "
                   f"{tuple(expected[k].shape)}")  # fmt: skip
    return "; ".join(out) or None


def load_pretrained(pretrained_dir: str | Path) -> tuple[MaskedAutoencoder, PretrainConfig]:
    """The whole MAE of a pretrain output directory, on the CPU in eval mode, and the run's config:
    rebuilt from its ``config.json`` and filled from its ``mae.pth`` (``{'model': state_dict}``)."""
    pretrained_dir = Path(pretrained_dir)
    cfg = _read_config(pretrained_dir / "config.json")
    path = pretrained_dir / "mae.pth"
    if not path.is_file():
        raise FigureError(f"{path} not found: --pretrained must be an output directory of `semmae pretrain` "
                          "(config.json, mae.pth); rerun that stage")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        why = str(exc).split(". ")[0].splitlines()[0][:160]
        if "Weights only load failed" in why:
            why = "not a torch.save file of tensors only; other objects are not loaded, for safety"
        raise FigureError(f"{path}: not a readable PyTorch weights file ({why}); rerun `semmae pretrain`") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        keys = sorted(map(str, state))[:5] if isinstance(state, dict) else type(state).__name__
        raise FigureError(f"{path}: expected {{'model': state_dict}} as `semmae pretrain` writes it, got {keys}")
    model = build_mae(cfg)
    problem = _state_mismatch(model.state_dict(), state["model"])
    if problem:
        raise FigureError(f"{path} does not fit the MAE described by {pretrained_dir / 'config.json'}: {problem}; "
                          "were the two files written by different runs? rerun `semmae pretrain`")  # fmt: skip
    model.load_state_dict(state["model"], strict=True)
    return model.eval(), cfg


def _warn_if_other_shards(meta: Path, part_shards: Path) -> None:
    """Warn when the run's ``meta.json`` records part shards other than ``part_shards`` (it is optional here)."""
    try:
        recorded = json.loads(meta.read_text()).get("part_shards_index_sha256") if meta.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        log.warning("%s is unreadable (%s): cannot check which part shards the run was trained on", meta, exc)
        return
    if recorded and recorded != file_sha256(part_shards / "index.json"):
        log.warning("%s: the run was trained on other part shards than %s (index.json differs): the figures show "
                    "today's part maps", meta, part_shards)  # fmt: skip


def draw_pretrain_figures(pretrained_dir: str | Path, part_shards: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw :data:`FIGURES` of the pretrain run in ``pretrained_dir`` on the validation images of
    ``part_shards`` into ``out_dir``; both are rendered before either is written, each atomically.
    Returns the written paths."""
    pretrained_dir, part_shards, out_dir = Path(pretrained_dir), Path(part_shards), Path(out_dir)
    with torch.random.fork_rng(devices=[]):  # building and drawing leave the caller's global RNG as it was
        model, cfg = load_pretrained(pretrained_dir)
        index = read_index(part_shards, PARTS_FORMAT)
        grid, num_parts = index["grid"][0], int(index["num_parts"])
        if grid != cfg.grid:
            raise FigureError(f"{part_shards}/index.json: part maps are {grid}x{grid} but the run in {pretrained_dir} "
                              f"has a {cfg.grid}x{cfg.grid} patch grid: pass the part shards it was trained on")  # fmt: skip
        _warn_if_other_shards(pretrained_dir / "meta.json", part_shards)
        pngs = render_pretrain_figures(model, cfg, num_parts, part_shards)
    paths = []
    for name, data in pngs.items():
        atomic_write_bytes(out_dir / name, data)
        paths.append(out_dir / name)
    return paths
