"""Pictures of part maps: validation images with their part ids overlaid in fixed colours."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.io import atomic_write_bytes

__all__ = ["PALETTE", "part_overlay_grid"]

# fixed colours per part id (tab20-like), so the same id has the same colour in every figure
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
], dtype=np.uint8)  # fmt: skip


def _overlay(image: np.ndarray, ids: np.ndarray, size: int, alpha: float = 0.55) -> np.ndarray:
    img = np.asarray(Image.fromarray(image.transpose(1, 2, 0)).resize((size, size), Image.Resampling.NEAREST), dtype=np.float32)
    colours = PALETTE[ids % len(PALETTE)]
    colours = np.asarray(Image.fromarray(colours).resize((size, size), Image.Resampling.NEAREST), dtype=np.float32)
    return ((1 - alpha) * img + alpha * colours).astype(np.uint8)


def part_overlay_grid(images: torch.Tensor, columns: dict[str, torch.Tensor], path: str | Path, cell: int = 96) -> None:
    """One row per image (``uint8 [B, 3, S, S]``): the image, then each segmentation in ``columns``."""
    titles = ["image", *columns]
    pad, head = 4, 16
    b = images.shape[0]
    canvas = Image.new("RGB", (len(titles) * (cell + pad) + pad, head + b * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((pad + c * (cell + pad), 2), title, fill="black")
    for r in range(b):
        img = images[r].numpy()
        cells = [np.asarray(Image.fromarray(img.transpose(1, 2, 0)).resize((cell, cell), Image.Resampling.BICUBIC))]
        cells += [_overlay(img, ids[r].numpy().astype(np.int64), cell) for ids in columns.values()]
        for c, arr in enumerate(cells):
            canvas.paste(Image.fromarray(arr), (pad + c * (cell + pad), head + pad + r * (cell + pad)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
