"""WebDataset shards: deterministic writing, the shard-set index, and safe decoding.

A prepared shard set is a directory::

    index.json            counts, per-shard counts and sha256, class names
    train/train-000000.tar ...
    val/val-000000.tar ...

Each sample holds ``__key__``, the image (``png`` or ``jpg``), ``cls`` (ASCII int) and ``json``
(source id, original size). Decoding only ever parses known extensions: nothing from a shard is
unpickled or executed.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import webdataset as wds
from PIL import Image

from pipeline.errors import PipelineError

__all__ = [
    "ShardFormatError",
    "INDEX_FORMAT",
    "write_shards",
    "read_index",
    "shard_paths",
    "iter_samples",
    "decode_sample",
    "decode_image",
]

INDEX_FORMAT = "semmae-shards/1"
TAR_MTIME = 0  # fixed entry mtime: byte-identical tars for identical inputs
IMAGE_KEYS = ("png", "jpg")


class ShardFormatError(PipelineError):
    """A shard, a sample or an index is missing or malformed; the message names it."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shards(samples: Iterable[dict[str, Any]], out_dir: Path, prefix: str, shard_size: int) -> list[dict]:
    """Write ``samples`` (dicts of ``__key__`` and bytes values) into ``prefix-NNNNNN.tar`` files.

    Entries are written in the given order with sorted extensions, a fixed mtime, uid/gid 0 and
    mode 0444, so identical samples give byte-identical shards. Returns per-shard descriptions.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    writer, count = None, 0

    def close() -> None:
        writer.close()
        path = out_dir / shards[-1]["file"]
        shards[-1].update(num_samples=count, sha256=_sha256(path), bytes=path.stat().st_size)

    for sample in samples:
        if writer is None or count == shard_size:
            if writer is not None:
                close()
            name = f"{prefix}-{len(shards):06d}.tar"
            shards.append({"file": name})
            writer = wds.TarWriter(str(out_dir / name), encoder=False, mtime=TAR_MTIME, user="", group="")
            count = 0
        writer.write(sample)
        count += 1
    if writer is not None:
        close()
    return shards


def read_index(shard_dir: Union[str, Path]) -> dict:
    """Load and sanity-check ``index.json`` of a prepared shard set."""
    path = Path(shard_dir) / "index.json"
    if not path.is_file():
        raise ShardFormatError(f"{path} not found: {shard_dir} is not a prepared shard set (run the prepare stage)")
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise ShardFormatError(f"{path}: format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
    return index


def shard_paths(shard_dir: Union[str, Path], split: str) -> list[str]:
    """The shard files of ``split``, in index order; each must exist."""
    shard_dir = Path(shard_dir)
    index = read_index(shard_dir)
    if split not in index["splits"]:
        raise ShardFormatError(f"{shard_dir}/index.json has no split {split!r} (has {sorted(index['splits'])})")
    paths = [shard_dir / split / s["file"] for s in index["splits"][split]["shards"]]
    for p in paths:
        if not p.is_file():
            raise ShardFormatError(f"shard {p} listed in {shard_dir}/index.json is missing")
    return [str(p) for p in paths]


def decode_image(data: bytes, mode: str = "RGB") -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert(mode) if mode and img.mode != mode else img


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode one raw WebDataset sample strictly: image bytes kept, ``cls`` -> int, ``json`` -> dict.

    Raises :class:`ShardFormatError` naming the shard and key when a field is missing or malformed.
    """
    key, url = sample.get("__key__"), sample.get("__url__")
    where = f"sample {key!r} in {url}"
    image_keys = [k for k in IMAGE_KEYS if k in sample]
    if len(image_keys) != 1:
        raise ShardFormatError(f"{where}: expected exactly one image entry ({'/'.join(IMAGE_KEYS)}), got {image_keys}")
    try:
        label = int(sample["cls"].decode("ascii"))
        meta = json.loads(sample["json"].decode("utf-8"))
    except KeyError as exc:
        raise ShardFormatError(f"{where}: missing entry {exc.args[0]!r}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardFormatError(f"{where}: malformed cls/json entry ({exc})") from None
    out = {"__key__": key, "__url__": url, "image": sample[image_keys[0]], "ext": image_keys[0], "cls": label}
    out["json"] = meta
    return out


def iter_samples(paths: list[str]) -> Iterator[dict[str, Any]]:
    """Iterate decoded samples of ``paths`` in order (single process, no shuffling)."""
    dataset = wds.WebDataset(paths, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for sample in dataset:
        yield decode_sample(sample)
