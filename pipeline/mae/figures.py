"""Pretraining figures: reconstructions of fixed validation images, and the curriculum's masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config.pretrain import PretrainConfig
from pipeline.data.images import IMAGENET_MEAN, IMAGENET_STD, normalize
from pipeline.data.shards import PARTS_FORMAT, shard_entries
from pipeline.mae.data import fixed_images
from pipeline.figures import overlay, save_grid, upscale
from pipeline.mae.masking import curriculum_alpha
from pipeline.mae.model import MaskedAutoencoder

__all__ = ["reconstruction_figure", "curriculum_figure", "masked_view", "curriculum_titles", "pretrain_figures"]

CELL = 96


def masked_view(image: np.ndarray, mask: np.ndarray, grid: int) -> np.ndarray:
    """``uint8 [3, S, S]`` with masked patches (``mask [L]`` = 1) greyed out, as ``[CELL, CELL, 3]``."""
    img = upscale(image, CELL).copy()
    cells = mask.reshape(grid, grid).astype(bool)
    shade = upscale(np.repeat(cells[None].astype(np.uint8) * 255, 3, 0), CELL) > 0
    img[shade] = (img[shade] * 0.25 + 96).astype(np.uint8)
    return img


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x.float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def reconstruction_figure(model: MaskedAutoencoder, cfg: PretrainConfig, images: torch.Tensor, parts: torch.Tensor,
                          masking, path: str | Path) -> None:  # fmt: skip
    """Rows: image, part map, masked input, reconstruction, reconstruction with the visible patches pasted."""
    device = next(model.parameters()).device
    x = normalize(images.to(device).float() / 255)
    _, pred = model(x, masking)
    rec = model.reconstruct(x, pred)
    pasted = model.reconstruct(x, pred, masking.mask)
    mask = masking.mask.cpu().numpy()
    rows = []
    for i in range(len(images)):
        img = images[i].numpy()
        rows.append([upscale(img, CELL, Image.Resampling.BICUBIC), overlay(img, parts[i].numpy(), CELL),
                     masked_view(img, mask[i], cfg.grid), upscale(_to_uint8(rec[i]), CELL, Image.Resampling.BICUBIC),
                     upscale(_to_uint8(pasted[i]), CELL, Image.Resampling.BICUBIC)])  # fmt: skip
    save_grid(rows, ["image", "parts", "masked", "reconstruction", "+ visible"], path)


def curriculum_figure(cfg: PretrainConfig, images: torch.Tensor, parts: torch.Tensor, masks: dict[str, torch.Tensor],
                      path: str | Path) -> None:  # fmt: skip
    """Rows: image, part map, then the masks of ``masks`` (column title -> ``[B, L]``) on the same images."""
    rows = []
    for i in range(len(images)):
        img = images[i].numpy()
        rows.append([upscale(img, CELL, Image.Resampling.BICUBIC), overlay(img, parts[i].numpy(), CELL)]
                    + [masked_view(img, m[i].cpu().numpy(), cfg.grid) for m in masks.values()])  # fmt: skip
    save_grid(rows, ["image", "parts", *masks], path)


def curriculum_titles(cfg: PretrainConfig) -> list[tuple[str, float]]:
    """(column title, alpha) at t = 0, T/2, T of ``cfg``'s schedule."""
    if cfg.masking == "random":
        return [("random t=0", 0.0), ("random t=T/2", 0.0), ("random t=T", 0.0)]
    out = []
    for name, t in (("t=0", 0.0), ("t=T/2", 0.5), ("t=T", 1.0)):
        a = curriculum_alpha(t, cfg.schedule, cfg.gamma, cfg.alpha)
        out.append((f"{name} a={a:.2f}", a))
    return out


def pretrain_figures(model: MaskedAutoencoder, cfg: PretrainConfig, num_parts: int, part_shards: str | Path,
                     figures_dir: str | Path) -> None:  # fmt: skip
    """``reconstruction.png`` (masking at the end of the schedule) and ``curriculum_masks.png`` (t = 0,
    T/2, T) for the first ``num_figure_images`` validation images, with fixed generators."""
    from pipeline.mae.train import make_masking, seeded_generator  # train imports this module's callers

    figures_dir = Path(figures_dir)
    skip = cfg.on_corrupt == "skip"
    val = [e.path for e in shard_entries(part_shards, "val", PARTS_FORMAT, url=cfg.shards_url, check_sizes=not skip)]
    images, parts = fixed_images(val, cfg.num_figure_images, num_parts, cfg.img_size, cfg.grid, skip=skip)
    device = next(model.parameters()).device
    parts_d = parts.to(device)
    schedule = curriculum_titles(cfg)  # (title, alpha) at t = 0, T/2, T
    masking = make_masking(cfg, parts_d, schedule[-1][1], num_parts, seeded_generator(device, cfg.seed, 1))
    reconstruction_figure(model, cfg, images, parts, masking, figures_dir / "reconstruction.png")
    masks = {title: make_masking(cfg, parts_d, a, num_parts, seeded_generator(device, cfg.seed, 2)).mask
             for title, a in schedule}  # fmt: skip
    curriculum_figure(cfg, images, parts, masks, figures_dir / "curriculum_masks.png")
