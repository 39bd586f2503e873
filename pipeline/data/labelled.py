"""Labelled images streamed from the prepared shards: the training streams and evaluation passes of
fine-tuning (and any stage that trains on augmented labelled images).

Training: every rank (and each of its loader workers) is one *stream* over its own slice of the
epoch-shuffled shard list, with its own shuffle buffer; a stream that runs out starts another pass,
so every rank yields exactly the batches the step count asks for (DDP ranks stay in lockstep). The
augmentation is timm's ``create_transform`` (RandomResizedCrop, flip, RandAugment, random erasing)
applied to PIL images.

Hand-written rather than webdataset's own shuffling: here the randomness of an epoch (shard order,
buffer, augmentation draws in ``random``/``numpy``/``torch``) is reseeded from ``(seed, epoch, stream)``,
so a run resumed at an epoch boundary sees exactly the batches of an unbroken run.

Evaluation: each rank reads every world-th shard of a split in order (centre crop, see
:func:`eval_transform`); the counts are summed over the ranks.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.images import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.shards import decode_image, decode_sample, iter_shard

__all__ = ["LabelledStream", "train_loader", "train_transform", "eval_transform", "eval_batches", "seed_everything",
           "mix_seed"]  # fmt: skip


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (order matters)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return seed


def seed_everything(seed: int) -> None:
    """Seed the three generators timm's transforms and Mixup draw from: ``random``, ``numpy``, ``torch``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, but keeping 0 bits gives the black image older Pillow gave (Pillow >= 11 raises)."""
    from PIL import Image

    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return _TIMM_POSTERIZE(img, bits_to_keep, **kwargs)


_TIMM_POSTERIZE = None


def _patch_posterize() -> None:
    # timm's increasing posterize reaches 0 bits at magnitude 10 (mstd 0.5 samples it), which Pillow >= 11 refuses
    global _TIMM_POSTERIZE
    from timm.data import auto_augment

    if _TIMM_POSTERIZE is None:
        _TIMM_POSTERIZE = auto_augment.posterize
        for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
            if auto_augment.NAME_TO_OP.get(name) is _TIMM_POSTERIZE:
                auto_augment.NAME_TO_OP[name] = _posterize


def train_transform(img_size: int, crop_scale: Sequence[float], hflip: float, auto_augment: Optional[str] = None,
                    random_erasing: float = 0.0) -> Callable:
    """Training augmentation built by timm: RandomResizedCrop (bicubic) + flip, optionally RandAugment
    (``auto_augment``, e.g. MAE fine-tuning's 'rand-m9-mstd0.5-inc1') and random erasing (pixel mode), ImageNet
    normalisation. No colour jitter (MAE uses none: off under RandAugment, absent from its linear probe)."""
    from timm.data import create_transform

    _patch_posterize()

    return create_transform(input_size=img_size, is_training=True, scale=tuple(crop_scale), hflip=hflip,
                            color_jitter=None, auto_augment=auto_augment, interpolation="bicubic",
                            re_prob=random_erasing, re_mode="pixel", re_count=1,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)  # fmt: skip


def eval_transform(img_size: int, crop_pct: float) -> Callable:
    """Resize the shorter side to ``img_size / crop_pct`` (bicubic), centre-crop ``img_size``, normalise
    (MAE's ImageNet evaluation: 256 -> 224 at crop_pct 0.875)."""
    from timm.data import create_transform

    return create_transform(input_size=img_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)  # fmt: skip


class LabelledStream(IterableDataset):
    """Endless ``(image tensor, label)`` samples of one epoch for one rank; each loader worker is a stream."""

    def __init__(self, shards: Sequence[str], counts: Sequence[int], transform: Callable, seed: int, epoch: int,
                 rank: int, world: int, shuffle_buffer: int) -> None:  # fmt: skip
        self.shards, self.counts = list(shards), list(counts)
        self.transform, self.seed, self.epoch = transform, seed, epoch
        self.rank, self.world, self.buffer = rank, world, shuffle_buffer

    def _my_shards(self, stream: int, streams: int, cycle: int) -> list[int]:
        order = np.random.default_rng([self.seed, self.epoch, cycle]).permutation(len(self.shards))
        mine = order[stream::streams].tolist()
        return mine or [int(order[stream % len(order)])]  # more streams than shards: share one

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        stream, streams = self.rank * workers + worker, self.world * workers
        seed_everything(mix_seed(self.seed, self.epoch, stream, 1))
        rng = np.random.default_rng([self.seed, self.epoch, stream, 2])
        buffer: list[dict] = []
        cycle = 0
        while True:
            for j in self._my_shards(stream, streams, cycle):
                for raw in iter_shard(self.shards[j], self.counts[j]):
                    buffer.append(raw)
                    if len(buffer) >= self.buffer:
                        yield self._item(buffer.pop(int(rng.integers(len(buffer)))))
            cycle += 1  # the buffer carries over: passes mix at their seams

    def _item(self, raw: dict) -> tuple[torch.Tensor, int]:
        s = decode_sample(raw)
        return self.transform(decode_image(s["image"], where=s["where"])), s["cls"]


def train_loader(shards: Sequence[str], counts: Sequence[int], transform: Callable, seed: int, epoch: int, rank: int,
                 world: int, shuffle_buffer: int, micro_batch: int, num_workers: int) -> DataLoader:  # fmt: skip
    """The epoch's loader of ``micro_batch``-image batches for this rank (endless: take what the steps need)."""
    data = LabelledStream(shards, counts, transform, seed, epoch, rank, world, shuffle_buffer)
    return DataLoader(data, batch_size=micro_batch, num_workers=num_workers, drop_last=True)


def eval_batches(shards: Sequence[str], counts: Sequence[int], transform: Callable, batch_size: int, rank: int,
                 world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """This rank's share of a split (every world-th shard, in order) as ``(images, labels)`` batches."""
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for j in range(rank, len(shards), world):
        for raw in iter_shard(shards[j], counts[j]):
            s = decode_sample(raw)
            images.append(transform(decode_image(s["image"], where=s["where"])))
            labels.append(s["cls"])
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels)
                images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)
