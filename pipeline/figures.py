"""Figures as PNG grids drawn with PIL: titled columns of image cells, part-id overlays in fixed colours."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.io import atomic_write_bytes

__all__ = ["PALETTE", "overlay", "upscale", "save_grid"]

# fixed colours per part id (tab20-like), so the same id has the same colour in every figure
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
], dtype=np.uint8)  # fmt: skip


def upscale(image: np.ndarray, size: int, resample: Image.Resampling = Image.Resampling.NEAREST) -> np.ndarray:
    """``uint8 [3, H, W]`` (or ``[H, W, 3]``) -> ``uint8 [size, size, 3]``."""
    if image.shape[0] == 3 and image.ndim == 3:
        image = image.transpose(1, 2, 0)
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), resample), dtype=np.uint8)


def overlay(image: np.ndarray, ids: np.ndarray, size: int, alpha: float = 0.55) -> np.ndarray:
    """Image ``uint8 [3, S, S]`` with part ids ``[g, g]`` blended over it in :data:`PALETTE` colours."""
    img = upscale(image, size).astype(np.float32)
    colours = upscale(PALETTE[ids.astype(np.int64) % len(PALETTE)], size).astype(np.float32)
    return ((1 - alpha) * img + alpha * colours).astype(np.uint8)


def save_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], path: str | Path) -> None:
    """Write rows of equally sized ``uint8 [cell, cell, 3]`` cells under column ``titles`` as a PNG, atomically."""
    cell = rows[0][0].shape[0]
    pad, head = 4, 16
    canvas = Image.new("RGB", (len(titles) * (cell + pad) + pad, head + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((pad + c * (cell + pad), 2), title, fill="black")
    for r, cells in enumerate(rows):
        for c, arr in enumerate(cells):
            canvas.paste(Image.fromarray(arr), (pad + c * (cell + pad), head + pad + r * (cell + pad)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
