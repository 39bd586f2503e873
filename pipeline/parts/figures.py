"""Pictures of part maps: validation images with their part ids overlaid in fixed colours."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from pipeline.figures import PALETTE, overlay, save_grid, upscale

__all__ = ["PALETTE", "part_overlay_grid"]

CAPTION = "Validation images and their part maps: one colour per part id, the same colour for the same id in every column"


def part_overlay_grid(images: torch.Tensor, columns: dict[str, torch.Tensor], path: str | Path, cell: int = 96,
                      caption: Optional[str] = CAPTION) -> None:  # fmt: skip
    """One row per image (``uint8 [B, 3, S, S]``): the image, then each segmentation in ``columns``."""
    rows = []
    for r in range(images.shape[0]):
        img = images[r].numpy()
        rows.append([upscale(img, cell, Image.Resampling.BICUBIC)] + [overlay(img, ids[r].numpy(), cell) for ids in columns.values()])
    save_grid(rows, ["image", *columns], path, caption)
