"""The pretraining loader: ``export_parts`` shards -> augmented images with their part maps.

Each epoch builds fresh streams whose randomness depends only on ``(seed, epoch, stream)``, so an
epoch's batches are the same whether or not the run was interrupted before it (the basis of
bit-exact resume). The data is a fixed number of streams (``pretrain.loader_streams``), each over its
own slice of the epoch-shuffled shard list; every step's global batch takes the same number of
samples from each stream, and the ranks and their workers only divide the streams among them, so a
fixed stream count gives the same batches, crops and masks on 1 GPU or 64 (see PartShardStream).

Augmentation is MAE's RandomResizedCrop + horizontal flip, applied *jointly*: the part map (which
covers the image's centred square, as ``export_parts`` computed it) is sampled at the centres of the
output patches inside the same crop (nearest) and flipped with the image.

Masking guides (``make_loader(guide=...)``), a fifth batch element for the strategies that need more than
the part map and the noise, computed without any random draw of its own (the crops, flips and noise
are those of a run without it):

- ``attention``: each sample's teacher attention map (``attn.npy``, exported beside ``parts.npy``)
  cropped and flipped exactly like its part map, ``float32 [b, grid*grid]`` row-major;
- ``block``: BEiT's block masks, ``bool [b, grid*grid]``, from each sample's own noise row by
  :func:`pipeline.mae.masking.block_flags` (BEiT's sequential per-image loop, so here in the loader
  workers as BEiT does, not on the training device).

Corrupt data (``pretrain.on_corrupt``): a sample that does not decode (its ``attn.npy`` included, when
it has one), lacks an entry (``attn.npy`` with the attention guide), or has a part map (or, with the
attention guide, an attention map) of the wrong shape or with ids >= N, and a shard that is unreadable
or ends before the count its index records, fail with the shard and sample key named (``fail``), or
are skipped (``skip``): the stream draws the next sample instead (a skip consumes none of the stream's
random draws, so runs stay deterministic and resumable) and reports ``(count, reason)`` with its next
item; the training loop sums them into the metrics and fails past ``max_skip_fraction``.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import distributed as D
from pipeline.mae.decode import EncodedImages, header_size, merge, pixels_chw
from pipeline.mae.masking import block_flags
from pipeline.data.shards import (
    ShardFormatError,
    decode_image,
    decode_sample,
    image_error,
    IMAGE_ERRORS,
    iter_shard,
)

__all__ = ["Crop", "sample_crop", "joint_crop", "PartShardStream", "PartShardLoader", "make_loader", "stream_count",
           "crop_parts", "decode_part_sample", "fixed_images", "GUIDES", "require_attention", "checked_attention"]  # fmt: skip

Crop = tuple[float, float, float, float]  # top, left, height, width inside the centred square, pixels
GUIDES = (None, "attention", "block")  # make_loader's extra batch element


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
    if flip:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out), crop_parts(parts, side, (top, left, ch, cw), grid, flip)


def crop_parts(parts: np.ndarray, side: float, crop: Crop, grid: int, flip: bool) -> np.ndarray:
    """The part map ``parts [g, g]`` (covering a ``side``-pixel square) sampled at the centres of the
    ``grid x grid`` output patches of ``crop`` (nearest), flipped with the image: ``[grid, grid]`` of
    ``parts``' dtype (the attention maps go the same way)."""
    top, left, ch, cw = crop
    centres = (np.arange(grid) + 0.5) / grid
    g = parts.shape[0]
    rows = np.clip(((top + centres * ch) / side * g).astype(np.int64), 0, g - 1)
    cols = np.clip(((left + centres * cw) / side * g).astype(np.int64), 0, g - 1)
    ids = parts[rows[:, None], cols[None, :]]
    return np.ascontiguousarray(ids[:, ::-1] if flip else ids)


def checked_part_sample(raw: dict, num_parts: int, grid: Optional[int] = None) -> tuple[dict, np.ndarray, str]:
    """Strictly decode one ``export_parts`` sample but its image: ``(sample, part map uint8 [g, g] with ids
    < N (and g = ``grid`` when given), 'sample <key> in <shard>' for messages)``."""
    s = decode_sample(raw)
    where = f"sample {s['__key__']!r} in {s['__url__']}"
    parts = s.get("parts")
    if parts is None:
        raise ShardFormatError(f"{where}: no parts.npy: these are not export_parts shards (run dvc repro export_parts)")
    if parts.ndim != 2 or parts.shape[0] != parts.shape[1] or parts.dtype != np.uint8:
        raise ShardFormatError(f"{where}: parts.npy must be a square uint8 map, got {parts.dtype} {parts.shape}")
    if grid is not None and parts.shape != (grid, grid):
        raise ShardFormatError(f"{where}: parts.npy is {parts.shape[0]}x{parts.shape[1]}, the shard set's grid is "
                               f"{grid}x{grid}")  # fmt: skip
    if parts.size and int(parts.max()) >= num_parts:
        raise ShardFormatError(f"{where}: parts.npy holds part id {int(parts.max())} >= num_parts={num_parts}")
    return s, parts, where


def checked_attention(s: dict, parts: np.ndarray, where: str) -> np.ndarray:
    """The attention map of a decoded sample ``s``, float16 ``[g, g]`` like its part map ``parts``;
    ShardFormatError naming the sample when it is missing or of another shape."""
    attn = s.get("attention")
    if attn is None:
        raise ShardFormatError(f"{where}: no attn.npy: these part shards were exported without attention maps "
                               "(rerun export_parts: dvc repro export_parts)")  # fmt: skip
    if attn.shape != parts.shape:
        raise ShardFormatError(f"{where}: attn.npy is {'x'.join(map(str, attn.shape))}, its parts.npy "
                               f"{parts.shape[0]}x{parts.shape[1]}: the shards are corrupt (dvc repro export_parts)")  # fmt: skip
    return attn


def require_attention(index: dict, where) -> None:
    """Refuse a part shard set (``where``: its directory) whose ``index.json`` records no attention maps:
    it was exported before they existed, so attention-guided masking has nothing to read."""
    entry = index.get("attention")
    if not isinstance(entry, dict):
        raise ShardFormatError(f"{where}/index.json records no teacher attention maps (part shards exported before "
                               "attention-guided masking): rerun export_parts (dvc repro export_parts)")  # fmt: skip
    if list(entry.get("grid", [])) != list(index.get("grid", [])) or entry.get("dtype") != "float16":
        raise ShardFormatError(f"{where}/index.json: attention maps {entry.get('dtype')} {entry.get('grid')} do not "
                               f"match the part grid {index.get('grid')} as float16: rerun export_parts "
                               "(dvc repro export_parts)")  # fmt: skip


def decode_part_sample(raw: dict, num_parts: int, grid: Optional[int] = None) -> tuple[Image.Image, np.ndarray, int, str]:
    """Strictly decode one ``export_parts`` sample: image, part map ``uint8 [g, g]`` with ids < N, label, key."""
    s, parts, where = checked_part_sample(raw, num_parts, grid)
    return decode_image(s["image"], mode="", where=where), parts, s["cls"], s["__key__"]


def _undecoded(s: dict, where: str) -> tuple[bytes | np.ndarray, tuple[int, int]]:
    """``(JPEG bytes | decoded pixels uint8 [3, H, W], (width, height))`` of a sample."""
    if s["ext"] == "jpg":
        try:
            return s["image"], header_size(s["image"])
        except IMAGE_ERRORS as exc:
            raise ShardFormatError(f"{where}: undecodable image ({image_error(exc)})") from None
    img = decode_image(s["image"], mode="", where=where)
    return pixels_chw(img), img.size


class PartShardStream(IterableDataset):
    """One epoch of one rank's data as items ``(images uint8 [b, 3, S, S], parts uint8 [b, G, G],
    labels [b], noise float32 [b, noise_dim][, guide], skipped)``, each item ``b = stream_batch`` samples
    of one stream; ``guide`` (see the module docstring) only when ``guide`` is not None.

    The data is ``num_streams`` independent streams (a fixed number, not tied to ranks or workers):
    stream ``s`` reads the epoch-shuffled shards ``s, s + num_streams, ...`` with its own generator
    seeded by ``(seed, epoch, s)``, which also draws each sample's crop, flip and masking noise. Per
    step the global batch is one item of every stream, so it is the same set of samples with the same
    augmentation and masks whatever the number of ranks, workers or accumulation steps. This rank
    serves the streams ``rank, rank + world, ...``; its workers share them round-robin, and the
    DataLoader's in-order round-robin over workers hands them back in stream order.
    """

    def __init__(self, shards: Sequence[str], num_parts: int, img_size: int, grid: int, stream_batch: int,
                 items: int, epoch: int, seed: int, streams: Sequence[int], num_streams: int,
                 scale: Sequence[float], ratio: Sequence[float], hflip: float, shuffle_buffer: int,
                 noise_dim: int, decode: str = "cpu", counts: Optional[Sequence[int]] = None,
                 on_corrupt: str = "fail", guide: Optional[str] = None,
                 block: Optional[tuple[float, int, float]] = None) -> None:  # fmt: skip
        self.shards, self.num_parts, self.img_size, self.grid = list(shards), num_parts, img_size, grid
        self.counts = list(counts) if counts is not None else [None] * len(self.shards)
        self.skip = on_corrupt == "skip"
        self.stream_batch, self.items, self.epoch, self.seed = stream_batch, items, epoch, seed
        self.streams, self.num_streams = list(streams), num_streams
        self.scale, self.ratio, self.hflip, self.shuffle_buffer = scale, ratio, hflip, shuffle_buffer
        self.noise_dim, self.decode = noise_dim, decode
        self.guide, self.block = guide, block

    def _samples(self, picks: list[int], rng: np.random.Generator, skipped: list) -> Iterator[dict]:
        """Raw samples of the shards ``picks``, cycled (reshuffled per pass) through a shuffle buffer."""
        buffer: list[dict] = []
        while True:
            read = 0
            for i in rng.permutation(len(picks)):
                shard, expected, n = self.shards[picks[i]], self.counts[picks[i]], 0
                try:
                    for raw in iter_shard(shard, expected):
                        n += 1
                        if len(buffer) < self.shuffle_buffer:
                            buffer.append(raw)
                            continue
                        j = int(rng.integers(len(buffer)))
                        buffer[j], raw = raw, buffer[j]
                        yield raw
                except ShardFormatError as exc:
                    if not self.skip:
                        raise
                    skipped.append((max(1, (expected or 0) - n), str(exc)))  # the samples it should still hold
                read += n
            if read == 0:
                raise ShardFormatError(f"no readable sample in the loader stream's shards {[self.shards[i] for i in picks]}"
                                       " (all truncated or empty): restore them (dvc checkout / dvc pull) or rerun export_parts")
            rng.shuffle(buffer)
            yield from buffer
            buffer = []

    def _decoded(self, raw: dict) -> tuple:
        """Everything of a sample that does not take a random draw (its attention map when the guide needs
        it, else None); raises ShardFormatError when corrupt."""
        s, ids, where = checked_part_sample(raw, self.num_parts, self.grid)
        attn = checked_attention(s, ids, where) if self.guide == "attention" else None
        if self.decode == "cpu":
            img = decode_image(s["image"], mode="", where=where)
            return img, ids, attn, s["cls"], min(img.size), None
        data, (w, h) = _undecoded(s, where)
        return data, ids, attn, s["cls"], min(w, h), (w, h, where)

    def _guide(self, attn: Optional[np.ndarray], side: float, crop: Crop, flip: bool, noise: np.ndarray) -> np.ndarray:
        """One sample's guide row from what was already drawn (no random draw of its own)."""
        if self.guide == "attention":
            return crop_parts(attn, side, crop, self.grid, flip).astype(np.float32).reshape(-1)
        return np.asarray(block_flags(noise, self.grid, *self.block), dtype=bool).reshape(-1)

    def _batches(self, stream: int, order: np.ndarray) -> Iterator[tuple]:
        rng = np.random.default_rng([self.seed, self.epoch, stream])
        picks = [int(i) for i in order[stream :: self.num_streams]]
        skipped: list[tuple[int, str]] = []
        samples = self._samples(picks, rng, skipped)
        budget = max(1, sum(self.counts[i] or 1 for i in picks))  # bad samples in a row before giving up
        while True:
            images, parts, labels, noise, guides = [], [], [], [], []
            encoded: list[tuple] = []
            bad_in_a_row = 0
            while len(parts) < self.stream_batch:
                raw = next(samples)  # outside the try: a stream with nothing readable left fails in any mode
                try:
                    data, ids, attn, label, side, jpeg = self._decoded(raw)
                except ShardFormatError as exc:
                    if not self.skip:
                        raise
                    skipped.append((1, str(exc)))
                    bad_in_a_row += 1
                    if bad_in_a_row > budget:
                        raise ShardFormatError(f"{bad_in_a_row} corrupt samples in a row in the shards "
                                               f"{[self.shards[i] for i in picks]}; last: {exc}") from None
                    continue
                bad_in_a_row = 0
                crop = sample_crop(side, self.scale, self.ratio, rng)
                flip = bool(rng.random() < self.hflip)
                if jpeg is None:
                    x, p = joint_crop(data, ids, self.img_size, self.grid, crop, flip)
                    images.append(x)
                else:  # the same draws in the same order; the image is decoded on the training device
                    w, h, source = jpeg
                    top0, left0 = (h - side) / 2, (w - side) / 2
                    encoded.append((data, (top0 + crop[0], left0 + crop[1], crop[2], crop[3]), flip, source))
                    p = crop_parts(ids, side, crop, self.grid, flip)
                parts.append(p)
                labels.append(label)
                noise.append(rng.random(self.noise_dim, dtype=np.float32))
                if self.guide is not None:
                    guides.append(self._guide(attn, side, crop, flip, noise[-1]))
            batch = EncodedImages.pack(encoded) if encoded else torch.from_numpy(np.stack(images))
            report, skipped[:] = list(skipped), []
            extra = (torch.from_numpy(np.stack(guides)),) if self.guide is not None else ()
            yield (batch, torch.from_numpy(np.stack(parts)), torch.tensor(labels), torch.from_numpy(np.stack(noise)),
                   *extra, report)  # fmt: skip

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        mine = [self._batches(s, order) for s in self.streams[worker::workers]]
        for _ in range(self.items):
            for batches in mine:
                yield next(batches)


def stream_count(num_streams: Optional[int], num_workers: int) -> int:
    """The loader's stream count: ``num_streams``, or ``ranks x max(1, workers)`` when None."""
    return num_streams or D.world_size() * max(1, num_workers)


class PartShardLoader:
    """One epoch of a rank's micro-batches ``(images, parts, labels, noise[, guide])``: ``batches`` of ``batch_size``
    (rank-local) samples, each the concatenation of one item from each of the rank's streams.
    ``skipped`` collects the ``(count, reason)`` of the corrupt samples skipped so far (on_corrupt=skip)."""

    def __init__(self, dataset: PartShardStream, per_batch: int, batches: int, num_workers: int) -> None:
        self.per_batch, self.batches = per_batch, batches
        self.skipped: list[tuple[int, str]] = []
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                                 pin_memory=torch.cuda.is_available(), prefetch_factor=4 if num_workers else None)  # fmt: skip

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        items = iter(self.loader)
        for _ in range(self.batches):
            group = [next(items) for _ in range(self.per_batch)]
            for item in group:
                self.skipped.extend(item[-1])
            group = [item[:-1] for item in group]
            if len(group) == 1:
                yield group[0]
                continue
            columns = list(zip(*group))
            images = merge(columns[0]) if isinstance(columns[0][0], EncodedImages) else torch.cat(columns[0])
            yield (images, *(torch.cat(c) for c in columns[1:]))


def make_loader(shards: Sequence[str], num_parts: int, img_size: int, grid: int, batch_size: int, batches: int,
                epoch: int, seed: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                shuffle_buffer: int, num_workers: int, num_streams: Optional[int] = None,
                noise_dim: int = 1, decode: str = "cpu", counts: Optional[Sequence[int]] = None,
                on_corrupt: str = "fail", guide: Optional[str] = None,
                block: Optional[tuple[float, int, float]] = None) -> PartShardLoader:  # fmt: skip
    """This rank's ``batches`` micro-batches of ``batch_size`` samples for ``epoch`` (see
    :class:`PartShardStream`); ``counts``: each shard's sample count from the index (a shard that ends
    early is truncated). ``guide``: None (4-element batches), ``"attention"`` or ``"block"`` (a fifth
    element, see the module docstring; ``block`` = ``(mask_ratio, min_patches, min_aspect)`` for
    :func:`pipeline.mae.masking.block_flags`). Fails, naming the keys to change, when the shards,
    streams, ranks, workers and batch do not divide."""
    if guide not in GUIDES:
        raise ValueError(f"make_loader guide={guide!r}: expected one of {list(GUIDES)}")
    if (guide == "block") != (block is not None) or (block is not None and len(block) != 3):
        raise ValueError(f"make_loader guide={guide!r} with block={block!r}: block=(mask_ratio, min_patches, "
                         "min_aspect) is required with guide='block' and only then")  # fmt: skip
    world = D.world_size()
    streams = stream_count(num_streams, num_workers)
    workers = max(1, num_workers)
    if streams % world or (streams // world) % workers:
        raise ShardFormatError(
            f"pretrain loader_streams={streams} must be a multiple of {world} rank(s) x {workers} loader worker(s) "
            f"per rank: set pretrain loader_streams to a multiple of {world * workers} (or null), or change num_workers"
        )
    per_rank = streams // world
    if batch_size % per_rank:
        raise ShardFormatError(
            f"the micro-batch of {batch_size} images per rank cannot be split over its {per_rank} loader streams: "
            f"make pretrain batch_size / (ranks x accum_steps) a multiple of loader_streams / ranks"
        )
    if len(shards) < streams:
        source = f"pretrain loader_streams={num_streams}" if num_streams else f"{world} rank(s) x {workers} worker(s)"
        raise ShardFormatError(
            f"{len(shards)} train shards cannot feed {streams} loader streams ({source}): every stream needs at "
            "least one shard. Lower loader_streams or num_workers, or re-shard with a smaller prepare.shard_size."
        )
    ds = PartShardStream(shards, num_parts, img_size, grid, batch_size // per_rank, batches, epoch, seed,
                         range(D.rank(), streams, world), streams, scale, ratio, hflip, shuffle_buffer, noise_dim,
                         decode, counts, on_corrupt, guide, block)  # fmt: skip
    return PartShardLoader(ds, per_rank, batches, num_workers)


def fixed_images(shards: Sequence[str], n: int, num_parts: int, img_size: int, grid: int, skip: bool = False,
                 with_attention: bool = False) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The first ``n`` samples of ``shards`` without augmentation (centred square): images, part maps, and
    with ``with_attention`` their attention maps ``float32 [n, grid, grid]`` (a sample without one is
    corrupt); ``skip``: pass over corrupt samples and unreadable shards instead of failing."""
    images: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    attention: list[np.ndarray] = []

    def stacked() -> tuple[torch.Tensor, ...]:
        out = (torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(parts)))
        return out + (torch.from_numpy(np.stack(attention)),) if with_attention else out

    for shard in shards:
        try:
            for raw in iter_shard(shard):
                try:
                    s, ids, where = checked_part_sample(raw, num_parts, grid)
                    attn = checked_attention(s, ids, where) if with_attention else None
                    img = decode_image(s["image"], mode="", where=where)
                except ShardFormatError:
                    if not skip:
                        raise
                    continue
                x, p = joint_crop(img, ids, img_size, grid, None, False)
                images.append(x)
                parts.append(p)
                if with_attention:
                    side = float(min(img.size))
                    attention.append(crop_parts(attn, side, (0.0, 0.0, side, side), grid, False).astype(np.float32))
                if len(images) == n:
                    return stacked()
        except ShardFormatError:
            if not skip:
                raise
    if not images:
        raise ShardFormatError(f"no readable validation sample in {list(shards)[:3]}... for the figures")
    return stacked()
