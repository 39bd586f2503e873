"""WebDataset shards: deterministic writing, the shard-set index, and safe decoding.

A prepared shard set is a directory::

    index.json            counts, per-shard counts and sha256, class names
    train/train-000000.tar ...
    val/val-000000.tar ...

Each sample holds ``__key__``, the image (``png`` or ``jpg``), ``cls`` (ASCII int) and ``json``
(source id, original size); part shards add ``parts.npy`` (uint8 part ids on the MAE patch grid). Decoding only ever parses known extensions: nothing from a shard is
unpickled or executed.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.io import file_sha256

__all__ = [
    "ShardFormatError",
    "INDEX_FORMAT",
    "PARTS_FORMAT",
    "select_ordinals",
    "write_shards",
    "write_tar",
    "iter_raw_samples",
    "read_index",
    "shard_paths",
    "iter_samples",
    "decode_sample",
    "decode_image",
]

INDEX_FORMAT = "semmae-shards/1"
PARTS_FORMAT = "semmae-parts/1"  # export_parts: the prepared samples plus parts.npy
_PRODUCER = {INDEX_FORMAT: "prepare", "semmae-features/1": "extract", PARTS_FORMAT: "export_parts"}
TAR_MTIME = 0  # fixed entry mtime: byte-identical tars for identical inputs
IMAGE_KEYS = ("png", "jpg")


class ShardFormatError(PipelineError):
    """A shard, a sample or an index is missing or malformed; the message names it."""


def _tar_writer(path: Path) -> wds.TarWriter:
    return wds.TarWriter(str(path), encoder=False, mtime=TAR_MTIME, user="", group="")


def write_tar(path: Path, samples: Iterable[dict[str, Any]]) -> dict:
    """Write ``samples`` into one tar at ``path`` (deterministic, see :func:`write_shards`); describe it."""
    count = 0
    with _tar_writer(path) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    return {"file": path.name, "num_samples": count, "sha256": file_sha256(path), "bytes": path.stat().st_size}


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
        shards[-1].update(num_samples=count, sha256=file_sha256(path), bytes=path.stat().st_size)

    for sample in samples:
        if writer is None or count == shard_size:
            if writer is not None:
                close()
            name = f"{prefix}-{len(shards):06d}.tar"
            shards.append({"file": name})
            writer = _tar_writer(out_dir / name)
            count = 0
        writer.write(sample)
        count += 1
    if writer is not None:
        close()
    return shards


def read_index(shard_dir: Union[str, Path], fmt: str = INDEX_FORMAT) -> dict:
    """Load and sanity-check the ``index.json`` of a stage's output directory (``fmt`` names its format)."""
    path = Path(shard_dir) / "index.json"
    if not path.is_file():
        raise ShardFormatError(
            f"{path} not found: {shard_dir} is not the output of the {_PRODUCER.get(fmt, fmt)} stage (run it first)"
        )
    index = json.loads(path.read_text())
    if index.get("format") != fmt:
        raise ShardFormatError(f"{path}: format {index.get('format')!r}, expected {fmt!r}")
    return index


SHARD_NAME = re.compile(r"^(train|val)-[0-9]{6}\.tar$")


def shard_paths(shard_dir: Union[str, Path], split: str, fmt: str = INDEX_FORMAT, url: Optional[str] = None) -> list[str]:
    """The shard files of ``split``, in index order; each must exist.

    ``url``: read the shards from a WebDataset URL template instead of ``shard_dir`` (which then only
    needs ``index.json``): ``{path}`` is replaced by ``<split>/<file>``, e.g.
    ``pipe:aws s3 cp s3://bucket/part_shards/{path} -`` or ``https://host/part_shards/{path}``.
    Shard names from ``index.json`` must look like ``train-000000.tar`` (nothing read from data reaches
    a path or a shell unchecked)."""
    shard_dir = Path(shard_dir)
    index = read_index(shard_dir, fmt)
    if split not in index["splits"]:
        raise ShardFormatError(f"{shard_dir}/index.json has no split {split!r} (has {sorted(index['splits'])})")
    names = [s.get("file") if isinstance(s, dict) else None for s in index["splits"][split]["shards"]]
    for name in names:
        if not isinstance(name, str) or not SHARD_NAME.match(name) or not name.startswith(split):
            raise ShardFormatError(
                f"{shard_dir}/index.json: shard name {name!r} in split {split!r} is not of the form "
                f"{split}-NNNNNN.tar; the index is corrupt or not written by this pipeline (rerun its stage)"
            )
    if url is not None:
        if "{path}" not in url:
            raise ShardFormatError(f"shard URL template {url!r} has no '{{path}}' placeholder (e.g. https://host/dir/{{path}})")
        return [url.replace("{path}", f"{split}/{name}") for name in names]
    paths = [shard_dir / split / name for name in names]
    for p in paths:
        if not p.is_file():
            raise ShardFormatError(f"shard {p} listed in {shard_dir}/index.json is missing")
    return [str(p) for p in paths]


def select_ordinals(total: int, limit: Optional[int], seed: int, split: str) -> Optional[set[int]]:
    """Seeded subset of sample ordinals (position in shard order) of a split; None = all."""
    if limit is None or limit >= total:
        return None
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split]])
    return set(rng.choice(total, size=limit, replace=False).tolist())


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
    if "parts.npy" in sample:
        try:
            out["parts"] = np.load(io.BytesIO(sample["parts.npy"]), allow_pickle=False)
        except ValueError as exc:
            raise ShardFormatError(f"{where}: malformed parts.npy ({exc})") from None
    return out


def iter_raw_samples(paths: list[str]) -> Iterator[dict[str, Any]]:
    """Iterate undecoded samples (bytes per entry) of ``paths`` in order (single process, no shuffling)."""
    yield from wds.WebDataset(paths, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)


def iter_samples(paths: list[str]) -> Iterator[dict[str, Any]]:
    """Iterate decoded samples of ``paths`` in order (single process, no shuffling)."""
    for sample in iter_raw_samples(paths):
        yield decode_sample(sample)
