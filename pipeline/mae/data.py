"""The pretraining loader: ``export_parts`` shards -> augmented images with their part maps.

Each epoch builds fresh streams whose randomness depends only on ``(seed, epoch, rank, worker)``,
so an epoch's batches are the same whether or not the run was interrupted before it (the basis of
bit-exact resume). Per epoch: the shard list is shuffled with an epoch seed (identically on every
rank), split with webdataset's ``split_by_node`` and ``split_by_worker``; each stream cycles over its
shards (reshuffled per pass) through a seeded shuffle buffer and yields a fixed number of batches,
so every rank takes the same number of steps however the shards divide.

Augmentation is MAE's RandomResizedCrop + horizontal flip, applied *jointly*: the part map (which
covers the image's centred square, as ``export_parts`` computed it) is sampled at the centres of the
output patches inside the same crop (nearest) and flipped with the image.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import distributed as D
from pipeline.data.shards import (
    ShardFormatError,
    decode_image,
    decode_sample,
    iter_raw_samples,
)

__all__ = ["Crop", "sample_crop", "joint_crop", "PartShardStream", "make_loader", "decode_part_sample", "fixed_images"]

Crop = tuple[float, float, float, float]  # top, left, height, width inside the centred square, pixels


def sample_crop(side: float, scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator) -> Crop:
    """RandomResizedCrop's box in a ``side x side`` square (torchvision's algorithm, continuous coordinates)."""
    area = side * side
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < w <= side and 0 < h <= side:
            return rng.uniform(0, side - h), rng.uniform(0, side - w), h, w
    return 0.0, 0.0, float(side), float(side)  # fallback: the whole square


def joint_crop(img: Image.Image, parts: np.ndarray, size: int, grid: int, crop: Optional[Crop], flip: bool
               ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Crop ``img``'s centred square to ``crop`` (``None`` = all of it), resize to ``size`` (bicubic), and
    sample the part map ``parts [g, g]`` (covering the same square) at the ``grid x grid`` output patch
    centres. Returns ``uint8 [3, size, size]`` and ``uint8 [grid, grid]``."""
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left0, top0 = (w - side) / 2, (h - side) / 2
    top, left, ch, cw = crop if crop is not None else (0.0, 0.0, float(side), float(side))
    box = (left0 + left, top0 + top, left0 + left + cw, top0 + top + ch)
    out = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=np.uint8).transpose(2, 0, 1)
    centres = (np.arange(grid) + 0.5) / grid
    g = parts.shape[0]
    rows = np.clip(((top + centres * ch) / side * g).astype(np.int64), 0, g - 1)
    cols = np.clip(((left + centres * cw) / side * g).astype(np.int64), 0, g - 1)
    ids = parts[rows[:, None], cols[None, :]]
    if flip:
        out, ids = out[:, :, ::-1], ids[:, ::-1]
    return np.ascontiguousarray(out), np.ascontiguousarray(ids)


def decode_part_sample(raw: dict, num_parts: int) -> tuple[Image.Image, np.ndarray, int, str]:
    """Strictly decode one ``export_parts`` sample: image, part map ``uint8 [g, g]`` with ids < N, label, key."""
    s = decode_sample(raw)
    where = f"sample {s['__key__']!r} in {s['__url__']}"
    parts = s.get("parts")
    if parts is None:
        raise ShardFormatError(f"{where}: no parts.npy: these are not export_parts shards (run dvc repro export_parts)")
    if parts.ndim != 2 or parts.shape[0] != parts.shape[1] or parts.dtype != np.uint8:
        raise ShardFormatError(f"{where}: parts.npy must be a square uint8 map, got {parts.dtype} {parts.shape}")
    if parts.size and int(parts.max()) >= num_parts:
        raise ShardFormatError(f"{where}: parts.npy holds part id {int(parts.max())} >= num_parts={num_parts}")
    try:
        img = decode_image(s["image"], mode="")
    except OSError as exc:
        raise ShardFormatError(f"{where}: undecodable image ({exc})") from None
    return img, parts, s["cls"], s["__key__"]


class PartShardStream(IterableDataset):
    """One epoch of augmented batches ``(images uint8 [B, 3, S, S], parts uint8 [B, G, G], labels [B])``.

    Every (rank, worker) stream yields its share of ``batches`` micro-batches of ``batch_size``.
    """

    def __init__(self, shards: Sequence[str], num_parts: int, img_size: int, grid: int, batch_size: int,
                 batches: int, epoch: int, seed: int, scale: Sequence[float], ratio: Sequence[float],
                 hflip: float, shuffle_buffer: int) -> None:  # fmt: skip
        self.shards, self.num_parts, self.img_size, self.grid = list(shards), num_parts, img_size, grid
        self.batch_size, self.batches, self.epoch, self.seed = batch_size, batches, epoch, seed
        self.scale, self.ratio, self.hflip, self.shuffle_buffer = scale, ratio, hflip, shuffle_buffer

    def _stream(self, shards: list[str], rng: np.random.Generator) -> Iterator[dict]:
        buffer: list[dict] = []
        while True:  # cycle over this stream's shards, reshuffled per pass
            for i in rng.permutation(len(shards)):
                for raw in iter_raw_samples([shards[i]]):
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(raw)
                        continue
                    j = int(rng.integers(len(buffer)))
                    buffer[j], raw = raw, buffer[j]
                    yield raw
            rng.shuffle(buffer)
            yield from buffer
            buffer = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        mine = list(wds.split_by_worker(wds.split_by_node([self.shards[i] for i in order])))
        quota = self.batches // workers + (worker < self.batches % workers)
        rng = np.random.default_rng([self.seed, self.epoch, D.rank(), worker])
        stream = self._stream(mine, rng)
        for _ in range(quota):
            images, parts, labels = [], [], []
            for raw in (next(stream) for _ in range(self.batch_size)):
                img, ids, label, _ = decode_part_sample(raw, self.num_parts)
                side = min(img.size)
                crop = sample_crop(side, self.scale, self.ratio, rng)
                x, p = joint_crop(img, ids, self.img_size, self.grid, crop, bool(rng.random() < self.hflip))
                images.append(x)
                parts.append(p)
                labels.append(label)
            yield torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(parts)), torch.tensor(labels)


def make_loader(shards: Sequence[str], num_parts: int, img_size: int, grid: int, batch_size: int, batches: int,
                epoch: int, seed: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                shuffle_buffer: int, num_workers: int) -> DataLoader:  # fmt: skip
    """A DataLoader over one epoch of :class:`PartShardStream`; fails when shards < ranks x workers."""
    streams = D.world_size() * max(1, num_workers)
    if len(shards) < streams:
        raise ShardFormatError(
            f"{len(shards)} train shards cannot feed {D.world_size()} rank(s) x {max(1, num_workers)} loader "
            f"worker(s): every stream needs at least one shard. Lower pretrain num_workers, or re-shard with a "
            "smaller prepare.shard_size."
        )
    ds = PartShardStream(shards, num_parts, img_size, grid, batch_size, batches, epoch, seed, scale, ratio, hflip,
                         shuffle_buffer)  # fmt: skip
    return DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None)  # fmt: skip


def fixed_images(shards: Sequence[str], n: int, num_parts: int, img_size: int, grid: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The first ``n`` samples of ``shards`` without augmentation (centred square): images, part maps."""
    images, parts = [], []
    for raw in iter_raw_samples(list(shards)):
        img, ids, _, _ = decode_part_sample(raw, num_parts)
        x, p = joint_crop(img, ids, img_size, grid, None, False)
        images.append(x)
        parts.append(p)
        if len(images) == n:
            break
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(parts))
