"""The ``prepare`` stage's logic: labelled images -> deterministic ``train``/``holdout``/``val`` WebDataset shards.

``holdout`` is a class-balanced, seeded set carved out of the training source before ``train_limit``
draws ``train`` from the rest (the two never share an image): choices such as the linear probe's
learning rate are made on it, so that ``val`` stays untouched for the reported numbers.

``source: synthetic_parts`` generates its images (``train_limit + holdout_size`` of the generator's split
``train``, ``val_limit`` of its split ``val``) and stores each one's ground-truth part mask beside it, as
the member ``truth.png`` (8-bit grayscale, ids into ``index.json``'s ``part_names``); training readers
ignore it, :func:`pipeline.data.images.load_split_truth` reads it.

Determinism: subsets, the held-out split and the sample order come from seeded generators; PNG
encoding, tar entries (fixed mtime, sorted extensions) and JSON (sorted keys) are byte-stable, and
encoding in worker processes keeps the input order. The same source and params give identical bytes.
"""

from __future__ import annotations

import functools
import heapq
import io
import json
import logging
import multiprocessing
import os
import tarfile
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.config.base import resolved_config
from pipeline.config.prepare import PrepareConfig
from pipeline.data.shards import IMAGE_ERRORS, INDEX_FORMAT, write_shards
from pipeline.data.sources import (
    DataSourceError,
    Record,
    load_fashion_mnist,
    load_synthetic_parts,
    scan_imagefolder,
)
from pipeline.data.synthetic_parts import PART_NAMES
from pipeline.io import atomic_output_dir, ensure_free_space, json_bytes

__all__ = ["prepare_dataset", "balanced_subset", "encode_record", "load_source", "select_splits", "SPLITS"]

log = logging.getLogger(__name__)
_SPLIT_IDS = {"train": 0, "val": 1, "holdout": 2}  # seed streams: [prepare.seed, id]
SPLITS = ("train", "holdout", "val")


def load_source(cfg: PrepareConfig) -> tuple[dict[str, list[Record]], list[str]]:
    """The source's records per split (``train``: the pool hold-out and train are drawn from) and class names."""
    if cfg.source == "fashion_mnist":
        return load_fashion_mnist(cfg.root)
    if cfg.source == "synthetic_parts":  # exactly the images the splits take: the hold-out and train_limit, val_limit
        return load_synthetic_parts(cfg.train_limit + cfg.holdout_size, cfg.val_limit, cfg.synthetic_size, cfg.seed)
    return scan_imagefolder(cfg.root, cfg.train_dir, cfg.val_dir, cfg.val_fraction, cfg.seed)


def balanced_subset(
    labels: np.ndarray, limit: Optional[int], num_classes: int, rng: np.random.Generator, reserve: int = 0
) -> np.ndarray:
    """Indices of a class-balanced random subset of ``limit`` items (all items when ``limit`` is None).

    Each class gets ``limit // K`` items (the remainder goes to the lowest class ids); a class with
    too few items gives its unused share to the others (water-filling). ``reserve`` items of every
    class are never taken (they stay for another split). Returned in ascending order.
    """
    labels = np.asarray(labels)
    if reserve == 0 and (limit is None or limit >= len(labels)):
        return np.arange(len(labels))
    counts = np.maximum(np.bincount(labels, minlength=num_classes) - reserve, 0)
    if limit is not None and limit > counts.sum():
        raise ValueError(f"limit {limit} exceeds the {int(counts.sum())} items available (reserve {reserve} per class)")
    if limit is None:
        limit = int(counts.sum())
    quota = np.zeros(num_classes, dtype=np.int64)
    remaining = limit
    while remaining > 0:
        active = np.flatnonzero(counts - quota > 0)
        share = np.full(len(active), remaining // len(active))
        share[: remaining % len(active)] += 1
        add = np.minimum(counts[active] - quota[active], share)
        quota[active] += add
        remaining -= int(add.sum())
    chosen = [rng.permutation(np.flatnonzero(labels == c))[: quota[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def _shorter_side_to(w: int, h: int, size: int) -> tuple[int, int]:
    scale = size / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _resize_shorter(img: Image.Image, size: int) -> Image.Image:
    return img.resize(_shorter_side_to(*img.size, size), Image.Resampling.BICUBIC)


def _source_name(cfg: PrepareConfig) -> str:
    """The source as messages name it: its directory, or the generator."""
    return "synthetic_parts" if cfg.source == "synthetic_parts" else cfg.root


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _is_16bit_gray(img: Image.Image, fmt: Optional[str]) -> bool:
    """16-bit grayscale: Pillow's ``I;16*`` modes, or ``I`` read from a PNG (older Pillow; PNG samples are at
    most 16 bits)."""
    return img.mode.startswith("I;16") or (img.mode == "I" and fmt == "PNG")


def encode_record(rec: Record, resize: Optional[int], jpeg_quality: int) -> tuple[Optional[dict], Optional[str]]:
    """Encode one record into a WebDataset sample, or return ``(None, reason)`` if it cannot be read or its
    pixels have no known 8-bit meaning (32-bit integer or float images).

    Decoded arrays become lossless PNG. JPEG files are passed through byte for byte unless a resize
    shrinks them (shorter side above ``resize``: then re-encoded as JPEG); other files are decoded and
    stored as PNG, 8 bits per channel (16-bit images keep their high byte). A record's ``mask`` becomes the
    member ``truth.png`` (grayscale PNG) of the stored image's size: resized with NEAREST (ids are not
    blended) when the image is shrunk.
    """
    try:
        if rec.pixels is not None:
            img, fmt, raw = Image.fromarray(rec.pixels), None, None
        else:
            raw = rec.path.read_bytes()
            img = Image.open(io.BytesIO(raw))
            fmt = img.format
            img.load()
    except Exception as exc:  # PIL raises many types for corrupt files
        return None, f"{type(exc).__name__}: {exc}"
    orig_size = list(img.size)
    if resize is not None and min(img.size) <= resize:
        resize = None  # only ever downscale: a small image keeps its pixels (and a JPEG its bytes)
    if fmt == "JPEG" and resize is None:
        ext, data = "jpg", raw
    else:
        if _is_16bit_gray(img, fmt):
            # Pillow's convert() clips 16-bit values at 255; keep the high byte (value >> 8), as Pillow itself
            # reads 16-bit RGB(A) PNGs
            img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8))  # 2-D uint8: mode L
        elif img.mode in ("I", "F") or img.mode.startswith("I;"):
            return None, (f"{'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels (Pillow mode "
                          f"{img.mode}) of unknown range: store the image as 8- or 16-bit PNG or JPEG")  # fmt: skip
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        if resize is not None:
            img = _resize_shorter(img, resize)
        if fmt == "JPEG":
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=jpeg_quality)
            ext, data = "jpg", buf.getvalue()
        else:
            ext, data = "png", _png(img)
    meta = {"source": rec.source_id, "orig_size": orig_size}
    sample = {
        "__key__": rec.key,
        ext: data,
        "cls": str(rec.label).encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    if rec.mask is not None:
        if rec.mask.dtype != np.uint8 or list(rec.mask.shape[::-1]) != orig_size:
            raise DataSourceError(f"{rec.source_id}: part mask {rec.mask.dtype} {list(rec.mask.shape)} is not uint8 of "
                                  f"the image's height x width {orig_size[::-1]}; the source is broken")  # fmt: skip
        truth = Image.fromarray(rec.mask)
        if truth.size != img.size:
            truth = truth.resize(img.size, Image.Resampling.NEAREST)
        sample["truth.png"] = _png(truth)
    return sample, None


def _encoded(records: list[Record], cfg: PrepareConfig, split: str, skipped: list[str]) -> Iterator[dict]:
    """Encode ``records`` in order (worker processes when asked), applying the corrupt-file policy."""
    fn = partial(encode_record, resize=cfg.resize, jpeg_quality=cfg.jpeg_quality)
    workers = (os.cpu_count() or 1) if cfg.num_workers is None else cfg.num_workers
    bar = tqdm(total=len(records), desc=f"prepare {split}", unit="img", mininterval=1.0)
    with multiprocessing.get_context("fork").Pool(workers) if workers > 1 and len(records) > 256 else _NoPool() as pool:
        for rec, (sample, error) in zip(records, pool.imap(fn, records, chunksize=64)):
            bar.update()
            if error is None:
                yield sample
                continue
            where = rec.path if rec.path is not None else rec.source_id
            if cfg.on_corrupt == "fail":
                raise DataSourceError(
                    f"{where}: cannot decode image ({error}). Fix or remove the file, "
                    "or set prepare.on_corrupt: skip to skip unreadable images"
                )
            log.warning("skipping unreadable image %s (%s)", where, error)
            skipped.append(rec.source_id)
    bar.close()


class _NoPool:
    """In-process stand-in for ``multiprocessing.Pool`` (``imap`` and context manager)."""

    def __enter__(self) -> "_NoPool":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def imap(self, fn, items, chunksize: int = 1):
        return map(fn, items)


_TAR_BLOCK = 512
_TAR_END = 2 * _TAR_BLOCK + tarfile.RECORDSIZE  # end-of-archive blocks, then zeros up to tarfile's 10 KiB record


@functools.lru_cache(maxsize=None)
def _tar_header(name_len: int) -> int:
    """Header bytes of a tar member with an ASCII name of ``name_len`` characters, as tarfile writes it (over
    100 characters add a pax header); the keys and extensions are ASCII by construction."""
    return len(tarfile.TarInfo("x" * name_len).tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape"))


def _tar_member(name_len: int, size: int) -> int:
    return _tar_header(name_len) + -(-size // _TAR_BLOCK) * _TAR_BLOCK  # data padded to whole blocks


def _png_bound(width: int, height: int, channels: int) -> int:
    """The most bytes Pillow's PNG writer gives an 8-bit image (ancillary chunks aside): the filtered rows (a
    filter byte each) under zlib's compressBound, since incompressible pixels grow; an IDAT chunk per 64 KiB
    written; signature, IHDR and IEND."""
    raw = height * (1 + width * channels)
    deflated = raw + (raw >> 12) + (raw >> 14) + (raw >> 25) + 13  # zlib's compressBound() (not in Python's zlib)
    return 8 + 25 + 12 + deflated + 12 * (deflated // 65536 + 1)


def _image_bound(rec: Record, resize: Optional[int]) -> int:
    """An upper bound of the bytes :func:`encode_record` stores for ``rec``'s image. Exact for arrays and
    PNG files (their header gives size and mode; no pixels are decoded) and for JPEGs passed through; a
    JPEG re-encoded after a resize counts as its source size (the downscaled image is smaller in practice:
    any bound would be several times the real size)."""
    if rec.pixels is not None:
        (h, w), channels, extra = rec.pixels.shape[:2], 1 if rec.pixels.ndim == 2 else 3, 0
    else:
        size = rec.path.stat().st_size
        if rec.path.suffix.lower() in (".jpg", ".jpeg"):
            return size
        try:
            with Image.open(rec.path) as img:
                if img.format == "JPEG":
                    return size
                (w, h), channels = img.size, 1 if img.mode == "L" or _is_16bit_gray(img, img.format) else 3
                extra = len(img.info.get("icc_profile") or b"") + 1024  # iCCP, tRNS: copied into the stored PNG
        except IMAGE_ERRORS:  # an unreadable file: skipped, or the run fails, later
            return size
    if resize is not None and min(w, h) > resize:
        w, h = _shorter_side_to(w, h, resize)
    return _png_bound(w, h, channels) + extra


def _truth_member_bound(rec: Record, resize: Optional[int]) -> int:
    """An upper bound of the tar member ``<key>.truth.png`` (the part mask, one channel at the stored image's
    size) of ``rec``; 0 without a mask."""
    if rec.mask is None:
        return 0
    h, w = rec.mask.shape
    if resize is not None and min(w, h) > resize:
        w, h = _shorter_side_to(w, h, resize)
    return _tar_member(len(rec.key) + len(".truth.png"), _png_bound(w, h, 1))


def _index_head(cfg: PrepareConfig, classes: list[str]) -> dict:
    """``index.json`` but its splits: ``part_names`` only for a source with ground-truth part masks (the
    indexes of the others stay as they were)."""
    index: dict = {"format": INDEX_FORMAT, "source": cfg.source, "classes": classes, "splits": {}, "skipped": {}}
    if cfg.source == "synthetic_parts":
        index["part_names"] = list(PART_NAMES)
    return index


def _index_bound(cfg: PrepareConfig, chosen: dict[str, list[Record]], classes: list[str]) -> int:
    """The size of the largest ``index.json`` the run can write: every count at 16 digits, every image
    that ``max_skip_fraction`` allows to be skipped (the longest source names) listed."""
    big = 10**15
    index = _index_head(cfg, classes)
    for split, records in chosen.items():
        shard = {"file": f"{split}-000000.tar", "num_samples": big, "sha256": "0" * 64, "bytes": big}
        shards = -(-len(records) // cfg.shard_size)
        index["splits"][split] = {"num_samples": big, "class_counts": [big] * len(classes), "shards": [shard] * shards}
        most = int(cfg.max_skip_fraction * len(records)) if cfg.on_corrupt == "skip" else 0
        index["skipped"][split] = heapq.nlargest(most, (r.source_id for r in records), key=lambda i: len(json.dumps(i)))
    return len(json_bytes(index))


def _estimated_bytes(cfg: PrepareConfig, chosen: dict[str, list[Record]], classes: list[str]) -> tuple[int, int]:
    """An upper bound of the shard set's bytes (tar headers, data padded to 512-byte blocks, each shard's
    end-of-archive padding, index.json, config.json; see :func:`_image_bound` for the one estimate) and its
    number of files and directories (each also fills the rest of a filesystem block)."""
    total, files = _index_bound(cfg, chosen, classes) + len(resolved_config(cfg, "prepare")), 3 + len(chosen)
    for records in chosen.values():
        shards = -(-len(records) // cfg.shard_size)
        total, files = total + shards * _TAR_END, files + shards
        for r in records:  # the members <key>.cls, <key>.json ({"orig_size": [w, h], "source": ...}), <key>.png|jpg
            n = len(r.key)  # ... and <key>.truth.png with a part mask
            total += _tar_member(n + 4, len(str(r.label))) + _tar_member(n + 4, _image_bound(r, cfg.resize))
            total += _truth_member_bound(r, cfg.resize)
            total += _tar_member(n + 5, len(json.dumps(r.source_id)) + len('{"orig_size": [, ], "source": }') + 2 * 10)
    return total, files


def _labels(records: list[Record]) -> np.ndarray:
    return np.array([r.label for r in records], dtype=np.int64)


def select_splits(cfg: PrepareConfig, splits: dict[str, list[Record]], num_classes: int) -> dict[str, list[Record]]:
    """The records of each output split, in shard order: ``holdout`` (``holdout_size``, class-balanced, out of
    the training source, one image per class always left for training), ``train`` (``train_limit`` out of the
    rest) and ``val`` (``val_limit``). Each split draws from its own seeded stream."""
    source = splits["train"]
    labels = _labels(source)
    present = int(np.count_nonzero(np.bincount(labels, minlength=num_classes)))
    if cfg.holdout_size > len(source) - present:
        raise DataSourceError(
            f"prepare.holdout_size={cfg.holdout_size}: the training source ({_source_name(cfg)}) has {len(source)} "
            f"images in {present} classes, so at most {max(0, len(source) - present)} can be held out while every "
            "class keeps one training image; lower prepare.holdout_size or add training images"
        )
    rng = np.random.default_rng([cfg.seed, _SPLIT_IDS["holdout"]])
    held = balanced_subset(labels, cfg.holdout_size, num_classes, rng, reserve=1)
    out = {"holdout": [source[i] for i in held[rng.permutation(len(held))]]}  # mixed classes inside every shard
    rest = np.setdiff1d(np.arange(len(source)), held)
    pools = {"train": ([source[i] for i in rest], cfg.train_limit), "val": (splits["val"], cfg.val_limit)}
    for split, (records, limit) in pools.items():
        rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split]])
        chosen = balanced_subset(_labels(records), limit, num_classes, rng)
        out[split] = [records[i] for i in chosen[rng.permutation(len(chosen))]]
    return {split: out[split] for split in SPLITS}


def prepare_dataset(cfg: PrepareConfig, out_dir: str | Path) -> dict:
    """Build the shard set in ``out_dir`` (replaced atomically on success) and return its metrics."""
    splits, classes = load_source(cfg)  # fails on a missing/malformed source before any output
    chosen = select_splits(cfg, splits, len(classes))  # ... and on a hold-out the source cannot give
    index = _index_head(cfg, classes)
    needed, files = _estimated_bytes(cfg, chosen, classes)
    ensure_free_space(out_dir, needed, "the prepared shards (prepare.train_limit / val_limit / holdout_size)", files)
    with atomic_output_dir(out_dir) as tmp:
        for split, selected in chosen.items():
            skipped: list[str] = []
            shards = write_shards(_encoded(selected, cfg, split, skipped), tmp / split, split, cfg.shard_size)
            if len(selected) and len(skipped) > cfg.max_skip_fraction * len(selected):
                raise DataSourceError(
                    f"{split}: skipped {len(skipped)} of {len(selected)} images, more than "
                    f"prepare.max_skip_fraction={cfg.max_skip_fraction}; first: {skipped[:5]}"
                )
            dropped = set(skipped)
            kept = np.array([r.label for r in selected if r.source_id not in dropped], dtype=np.int64)
            if kept.size == 0:
                raise DataSourceError(f"{split}: no images left to write (source {_source_name(cfg)})")
            index["splits"][split] = {
                "num_samples": int(kept.size),
                "class_counts": np.bincount(kept, minlength=len(classes)).tolist(),
                "shards": shards,
            }
            index["skipped"][split] = sorted(skipped)
        (tmp / "index.json").write_bytes(json_bytes(index))
        (tmp / "config.json").write_bytes(resolved_config(cfg, "prepare"))
    return {
        "num_classes": len(classes),
        **{
            split: {
                "num_samples": s["num_samples"],
                "num_shards": len(s["shards"]),
                "skipped": len(index["skipped"][split]),
            }
            for split, s in index["splits"].items()
        },
    }
