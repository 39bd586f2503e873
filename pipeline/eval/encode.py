"""Frozen encoders (``uint8 images [B, 3, S, S] -> features [B, D]``, or from normalised float images),
and one streamed pass of the prepared splits through several of them (the linear probe's and the teacher's k-NN)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import distributed as D
from pipeline.data.images import normalize, to_square
from pipeline.data.shards import decode_image, iter_samples, read_index, select_ordinals, shard_entries

__all__ = ["FrozenEncoder", "vit_encoder", "pixel_encoder", "encode_splits"]


class FrozenEncoder:
    """A frozen encoder: ``encoder(uint8 images)`` normalises the images itself (cached features, k-NN);
    ``encoder.normalized(images)`` takes ImageNet-normalised float images, as the transforms of
    :mod:`pipeline.data.labelled` give them (the online probe). Both return ``[B, D]`` fp32 features."""

    def __init__(self, normalized: Callable[[torch.Tensor], torch.Tensor], device: Optional[torch.device] = None):
        self._normalized, self.device = normalized, device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device) if self.device is not None else images
        return self._normalized(normalize(x.float() / 255))

    @torch.no_grad()
    def normalized(self, images: torch.Tensor) -> torch.Tensor:
        return self._normalized(images.to(self.device) if self.device is not None else images)


def vit_encoder(vit: nn.Module, device: torch.device) -> FrozenEncoder:
    """The CLS token after the final norm of a frozen timm ViT (bf16 autocast on CUDA)."""
    vit.eval().to(device)

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return vit.forward_features(x)[:, 0].float()

    return FrozenEncoder(encode, device)


def pixel_encoder(size: Optional[int] = None) -> FrozenEncoder:
    """The raw-pixels reference: normalised pixels (area-resized to ``size`` first if given), flattened."""

    def encode(x: torch.Tensor) -> torch.Tensor:
        if size is not None and size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="area")
        return x.flatten(1)

    return FrozenEncoder(encode)


@torch.no_grad()
def _encode_shard(shard: str, count: int, img_size: int, encoders: dict, batch_size: int, keep: Optional[set[int]], first: int,
                  bar: tqdm, crop_pct: float = 1.0) -> tuple[dict[str, torch.Tensor], list[int]]:  # fmt: skip
    out: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    ys: list[int] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        x = torch.from_numpy(np.stack(batch))
        for name, encode in encoders.items():
            out[name].append(encode(x).float().cpu())
        bar.update(len(batch))
        batch.clear()

    for i, s in enumerate(iter_samples([shard], [count])):
        if keep is not None and first + i not in keep:
            continue
        batch.append(to_square(decode_image(s["image"], where=s["where"]), img_size, crop_pct))
        ys.append(s["cls"])
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return {name: torch.cat(v) if v else torch.empty(0, 0) for name, v in out.items()}, ys


@torch.no_grad()
def encode_splits(prepared: str | Path, img_size: int, encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                  batch_size: int, desc: str = "encode", limit: Optional[int] = None, seed: int = 0,
                  splits: Sequence[str] = ("train", "val"), crop_pct: float = 1.0,
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:  # fmt: skip
    """Stream the prepared ``splits`` once through every encoder: ``({encoder: {split: features fp32 [N, D]}},
    {split: labels})`` in shard order. Images are squared by :func:`~pipeline.data.images.to_square` with
    ``crop_pct``.

    Only one batch of images is in memory at a time, so a split of any size (ImageNet's 1.28M) is
    encoded in the memory of its features. Batches never cross a shard, and under ``torchrun`` every
    rank encodes every world-th shard and receives the others' by broadcast, so every rank ends with
    the same features as a single process would compute. ``limit``: a seeded subset of at most that
    many images per split (the others are not decoded)."""
    index = read_index(prepared)
    feats: dict[str, dict[str, torch.Tensor]] = {name: {} for name in encoders}
    labels: dict[str, torch.Tensor] = {}
    world, rank = D.world_size(), D.rank()
    for split in splits:
        entries = shard_entries(prepared, split)
        shards, counts = [e.path for e in entries], [e.num_samples for e in entries]
        keep = select_ordinals(sum(counts), limit, seed, split)
        firsts = np.cumsum([0, *counts[:-1]]).tolist()
        sizes = [c if keep is None else sum(1 for i in range(f, f + c) if i in keep) for f, c in zip(firsts, counts)]
        bar = tqdm(total=sum(sizes[rank::world]), desc=f"{desc}: {split}", unit="img", mininterval=1.0,
                   disable=not D.is_main())  # fmt: skip
        parts: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
        for j, shard in enumerate(shards):
            if j % world == rank:
                f, ys = _encode_shard(shard, counts[j], img_size, encoders, batch_size, keep, firsts[j], bar, crop_pct)
                part = ({n: t.contiguous() for n, t in f.items()}, torch.tensor(ys, dtype=torch.int64))
            else:
                part = ({}, torch.empty(sizes[j], dtype=torch.int64))
            if world > 1:  # the owner's features reach every rank, in shard order
                owner = j % world
                for name in encoders:
                    shape = torch.tensor(part[0][name].shape if owner == rank else (0, 0), dtype=torch.int64)
                    D.broadcast(shape, owner)
                    if owner != rank:
                        part[0][name] = torch.empty(tuple(shape.tolist()), dtype=torch.float32)
                    D.broadcast(part[0][name], owner)  # in place, on the CPU whatever the backend
                D.broadcast(part[1], owner)
            parts.append(part)
        bar.close()
        labels[split] = torch.cat([p[1] for p in parts]) if parts else torch.empty(0, dtype=torch.int64)
        for name in encoders:
            feats[name][split] = torch.cat([p[0][name] for p in parts if p[0][name].numel()]) if parts else torch.empty(0)
    return feats, labels
