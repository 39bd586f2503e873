"""Decoded image tensors from prepared shards, for stages that work on small images in memory."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.data.shards import (
    IMAGE_ERRORS,
    ShardFormatError,
    decode_image,
    decode_sample,
    decode_truth,
    image_error,
    iter_raw_samples,
    iter_samples,
    read_index,
    shard_entries,
)

__all__ = ["to_square", "truth_to_square", "load_split", "load_split_truth", "IMAGENET_MEAN", "IMAGENET_STD",
           "normalize"]  # fmt: skip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _square(img: Image.Image, size: int, crop_pct: float, resample: Image.Resampling) -> Image.Image:
    """:func:`to_square`'s geometry with ``resample``: the one place it is computed, so that a part mask
    (:func:`truth_to_square`) stays on the pixels of its image."""
    # by hand rather than torchvision's Resize + CenterCrop: Resize truncates the long side where this rounds,
    # and the stages' tensors (and the tests that pin them) come from this exact arithmetic
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must lie in (0, 1]")
    w, h = img.size
    short = size if crop_pct == 1.0 else math.floor(size / crop_pct)
    scale = short / min(w, h)
    nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_square(img: Image.Image, size: int, crop_pct: float = 1.0) -> np.ndarray:
    """Resize the shorter side to ``floor(size / crop_pct)`` (bicubic), centre-crop to ``size x size``; RGB
    ``uint8 [3, S, S]``. ``crop_pct=1.0``: the shorter side becomes ``size`` (the whole short side is kept);
    MAE's ImageNet evaluation is 0.875 (256 -> 224), timm's ``crop_pct`` convention."""
    img = _square(img.convert("RGB"), size, crop_pct, Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def truth_to_square(mask: np.ndarray, size: int, crop_pct: float = 1.0) -> np.ndarray:
    """A part mask ``uint8 [H, W]`` through :func:`to_square`'s geometry with NEAREST resampling (ids are not
    blended): ``uint8 [size, size]``, aligned with ``to_square`` of its image; the identity when ``H = W = size``
    and ``crop_pct = 1``."""
    return np.asarray(_square(Image.fromarray(mask), size, crop_pct, Image.Resampling.NEAREST), dtype=np.uint8)


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


_NO_TRUTH = "the shard set has no ground-truth part masks (only prepare.source: synthetic_parts writes them)"


def load_split_truth(shard_dir: Union[str, Path], split: str, size: int, crop_pct: float = 1.0,
                     ) -> tuple[torch.Tensor, list[str]]:  # fmt: skip
    """The ground-truth part masks (``truth.png``) of ``split`` as ``uint8 [N, size, size]`` and the keys, in
    shard order: mask ``i`` lies on the pixels of :func:`load_split`'s image ``i`` (the same geometry,
    NEAREST). ShardFormatError when the shard set has no masks, or a sample lacks its mask or has one of
    another size than its image."""
    index = read_index(shard_dir)
    if "part_names" not in index:
        raise ShardFormatError(f"{shard_dir}/index.json (source {index.get('source')!r}) records no part_names: "
                               f"{_NO_TRUTH}")  # fmt: skip
    entries = shard_entries(shard_dir, split)  # checks the split, the names and the sizes
    total = index["splits"][split]["num_samples"]
    masks, keys = np.empty((total, size, size), dtype=np.uint8), []
    for i, raw in enumerate(iter_raw_samples([e.path for e in entries], [e.num_samples for e in entries])):
        s = decode_sample(raw)
        if "truth.png" not in raw:
            raise ShardFormatError(f"{s['where']}: no truth.png: {_NO_TRUTH}")
        mask = decode_truth(raw["truth.png"], s["where"])
        try:
            with Image.open(io.BytesIO(s["image"])) as img:  # the header only: the size the mask must have
                image_size = img.size
        except IMAGE_ERRORS as exc:
            raise ShardFormatError(f"{s['where']}: undecodable image ({image_error(exc)})") from None
        if mask.shape[::-1] != image_size:
            raise ShardFormatError(f"{s['where']}: truth.png is {mask.shape[1]}x{mask.shape[0]}, its image "
                                   f"{image_size[0]}x{image_size[1]}: the shards are corrupt (rerun prepare)")
        if i < total:
            masks[i] = truth_to_square(mask, size, crop_pct)
        keys.append(s["__key__"])
    if len(keys) != total:
        raise RuntimeError(f"{shard_dir}/index.json says {total} {split} samples, the shards hold {len(keys)}")
    return torch.from_numpy(masks), keys


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> ImageNet-normalised (what iBOT/timm ViTs expect)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std
