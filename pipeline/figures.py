"""Figures as PNG grids drawn with PIL: titled columns of image cells, part-id overlays in fixed colours.

Text is drawn with PIL's bundled scalable font (FreeType) at sizes readable at 100% zoom; the same
inputs give the same PNG bytes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.io import atomic_write_bytes

__all__ = ["PALETTE", "TITLE_SIZE", "CAPTION_SIZE", "overlay", "upscale", "render_grid", "save_grid", "font"]

# fixed colours per part id (tab20-like), so the same id has the same colour in every figure
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
], dtype=np.uint8)  # fmt: skip

TITLE_SIZE = 15  # column titles, in pixels
CAPTION_SIZE = 17  # the figure's caption above the columns
PAD = 6


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled font at ``size`` pixels (its tiny bitmap font only where PIL lacks FreeType)."""
    return ImageFont.load_default(size=size)


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


def _pieces(draw: ImageDraw.ImageDraw, word: str, fnt, width: int) -> list[str]:
    """``word`` as is, or split after its hyphens (then between characters) where it is wider than ``width``."""
    if draw.textlength(word, font=fnt) <= width:
        return [word]
    if "-" in word.rstrip("-"):
        head, _, tail = word.partition("-")
        return [head + "-"] + _pieces(draw, tail, fnt, width)
    out, line = [], ""
    for ch in word:
        if line and draw.textlength(line + ch, font=fnt) > width:
            out.append(line)
            line = ""
        line += ch
    return out + [line]


def _wrap(draw: ImageDraw.ImageDraw, text: str, fnt, width: int) -> list[str]:
    """``text`` broken at spaces (and inside words too wide alone) into lines no wider than ``width`` pixels."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            for piece in _pieces(draw, word, fnt, width):
                joined = f"{line} {piece}" if line and not line.endswith("-") else line + piece
                if line and draw.textlength(joined, font=fnt) > width:
                    lines.append(line)
                    line = piece
                else:
                    line = joined
        lines.append(line)
    return lines


def render_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], caption: Optional[str] = None) -> bytes:
    """PNG bytes of rows of equally sized ``uint8 [cell, cell, 3]`` cells under column ``titles`` (wrapped
    to the cell width), with an optional ``caption`` (wrapped to the figure width) above them."""
    cell = rows[0][0].shape[0]
    width = len(titles) * (cell + PAD) + PAD
    title_font, caption_font = font(TITLE_SIZE), font(CAPTION_SIZE)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caption_lines = _wrap(probe, caption, caption_font, width - 2 * PAD) if caption else []
    title_lines = [_wrap(probe, t, title_font, cell) for t in titles]
    caption_h = len(caption_lines) * (CAPTION_SIZE + 4) + (PAD if caption_lines else 0)
    head = PAD + caption_h + max(len(t) for t in title_lines) * (TITLE_SIZE + 3)
    canvas = Image.new("RGB", (width, head + len(rows) * (cell + PAD) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(caption_lines):
        draw.text((PAD, PAD + i * (CAPTION_SIZE + 4)), line, fill="black", font=caption_font)
    for c, lines in enumerate(title_lines):
        for i, line in enumerate(lines):
            draw.text((PAD + c * (cell + PAD), PAD + caption_h + i * (TITLE_SIZE + 3)), line, fill="black", font=title_font)
    for r, cells in enumerate(rows):
        for c, arr in enumerate(cells):
            canvas.paste(Image.fromarray(arr), (PAD + c * (cell + PAD), head + PAD + r * (cell + PAD)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def save_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], path: str | Path,
              caption: Optional[str] = None) -> None:  # fmt: skip
    """Write :func:`render_grid`'s PNG to ``path``, atomically."""
    atomic_write_bytes(path, render_grid(rows, titles, caption))
