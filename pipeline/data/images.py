"""Decoded image tensors from prepared shards, for stages that work on small images in memory."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.data.shards import decode_image, iter_samples, read_index, shard_entries

__all__ = ["to_square", "load_split", "IMAGENET_MEAN", "IMAGENET_STD", "normalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_square(img: Image.Image, size: int, crop_pct: float = 1.0) -> np.ndarray:
    """Resize the shorter side to ``floor(size / crop_pct)`` (bicubic), centre-crop to ``size x size``; RGB
    ``uint8 [3, S, S]``. ``crop_pct=1.0``: the shorter side becomes ``size`` (the whole short side is kept);
    MAE's ImageNet evaluation is 0.875 (256 -> 224), timm's ``crop_pct`` convention."""
    # by hand rather than torchvision's Resize + CenterCrop: Resize truncates the long side where this rounds,
    # and the stages' tensors (and the tests that pin them) come from this exact arithmetic
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must lie in (0, 1]")
    img = img.convert("RGB")
    w, h = img.size
    short = size if crop_pct == 1.0 else math.floor(size / crop_pct)
    scale = short / min(w, h)
    nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def iter_split(shard_dir: Union[str, Path], split: str, size: int, crop_pct: float = 1.0,
               ) -> Iterator[tuple[str, np.ndarray, int]]:  # fmt: skip
    """``(key, uint8 [3, size, size], label)`` for every sample of ``split``, in shard order (see :func:`to_square`)."""
    entries = shard_entries(shard_dir, split)
    for s in iter_samples([e.path for e in entries], [e.num_samples for e in entries]):
        yield s["__key__"], to_square(decode_image(s["image"], where=s["where"]), size, crop_pct), s["cls"]


def load_split(shard_dir: Union[str, Path], split: str, size: int, desc: str = "", crop_pct: float = 1.0,
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:  # fmt: skip
    """All images of ``split`` as ``uint8 [N, 3, size, size]``, labels ``int64 [N]`` and keys (shard order)."""
    total = read_index(shard_dir)["splits"][split]["num_samples"]
    images = np.empty((total, 3, size, size), dtype=np.uint8)
    labels, keys = np.empty(total, dtype=np.int64), []
    for i, (key, img, label) in enumerate(
        tqdm(iter_split(shard_dir, split, size, crop_pct), total=total, desc=desc or f"load {split}", unit="img", mininterval=1.0)
    ):
        images[i], labels[i] = img, label
        keys.append(key)
    if len(keys) != total:
        raise RuntimeError(f"{shard_dir}/index.json says {total} {split} samples, the shards hold {len(keys)}")
    return torch.from_numpy(images), torch.from_numpy(labels), keys


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> ImageNet-normalised (what iBOT/timm ViTs expect)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std
