"""WebDataset shards: deterministic writing, the shard-set index, and safe decoding.

A prepared shard set is a directory::

    index.json            counts, per-shard counts and sha256, class names
    train/train-000000.tar ...
    val/val-000000.tar ...

Each sample holds ``__key__``, the image (``png`` or ``jpg``), ``cls`` (ASCII int) and ``json``
(source id, original size); ``prepare.source: synthetic_parts`` adds ``truth.png`` (the ground-truth part
mask, read by :func:`decode_truth` only: :func:`decode_sample` ignores it); part shards add ``parts.npy``
(uint8 part ids on the MAE patch grid) and ``attn.npy`` (float16, the teacher's CLS attention on the same
grid). Decoding only ever parses known extensions: nothing from a shard is unpickled or executed.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.io import file_sha256

__all__ = [
    "ShardFormatError",
    "ShardSizeError",
    "INDEX_FORMAT",
    "PARTS_FORMAT",
    "select_ordinals",
    "write_shards",
    "write_tar",
    "iter_raw_samples",
    "iter_shard",
    "read_index",
    "ShardEntry",
    "shard_entries",
    "shard_paths",
    "iter_samples",
    "decode_sample",
    "decode_image",
    "decode_truth",
    "read_npy_uint8",
    "read_npy_float16",
    "image_error",
    "IMAGE_ERRORS",
]

INDEX_FORMAT = "semmae-shards/1"
PARTS_FORMAT = "semmae-parts/1"  # export_parts: the prepared samples plus parts.npy
_PRODUCER = {INDEX_FORMAT: "prepare", "semmae-features/1": "extract", PARTS_FORMAT: "export_parts"}
TAR_MTIME = 0  # fixed entry mtime: byte-identical tars for identical inputs
IMAGE_KEYS = ("png", "jpg")


class ShardFormatError(PipelineError):
    """A shard, a sample or an index is missing or malformed; the message names it."""


class ShardSizeError(ShardFormatError):
    """Shards whose size differs from what ``index.json`` records (truncated, or replaced)."""


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


SHARD_NAME = re.compile(r"^(train|holdout|val)-[0-9]{6}\.tar$")


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a split as ``index.json`` records it: where to read it, its checked file name, how
    many samples it holds and (when recorded) its size in bytes."""

    path: str
    file: str
    num_samples: int
    bytes: Optional[int]


def shard_entries(shard_dir: Union[str, Path], split: str, fmt: str = INDEX_FORMAT, url: Optional[str] = None,
                  check_sizes: bool = True) -> list[ShardEntry]:  # fmt: skip
    """The shards of ``split`` in index order, each checked before anything is read from it.

    Shard names from ``index.json`` must look like ``train-000000.tar`` (nothing read from data reaches
    a path or a shell unchecked) and counts must be integers. Local shards must exist and, with
    ``check_sizes``, have the size the index records: tarfile's stream reader ends a truncated tar
    early *without an error*, so this is what turns a shard cut short by a full disk or an interrupted
    copy into an error before any compute (all mismatches listed at once).

    ``url``: read the shards from a WebDataset URL template instead of ``shard_dir`` (which then only
    needs ``index.json``): ``{path}`` is replaced by ``<split>/<file>``, e.g.
    ``pipe:aws s3 cp s3://bucket/part_shards/{path} -`` or ``https://host/part_shards/{path}``; their
    sizes cannot be checked up front, :func:`iter_shard` counts their samples instead."""
    shard_dir = Path(shard_dir)
    index = read_index(shard_dir, fmt)
    if split not in index["splits"]:
        raise ShardFormatError(f"{shard_dir}/index.json has no split {split!r} (has {sorted(index['splits'])})")
    entries = []
    for s in index["splits"][split].get("shards", []):
        name = s.get("file") if isinstance(s, dict) else None
        if not isinstance(name, str) or not SHARD_NAME.match(name) or not name.startswith(split):
            raise ShardFormatError(
                f"{shard_dir}/index.json: shard name {name!r} in split {split!r} is not of the form "
                f"{split}-NNNNNN.tar; the index is corrupt or not written by this pipeline (rerun its stage)"
            )
        count, size = s.get("num_samples"), s.get("bytes")
        if type(count) is not int or count < 0 or not (size is None or (type(size) is int and size >= 0)):
            raise ShardFormatError(f"{shard_dir}/index.json: shard {name}: num_samples={count!r} / bytes={size!r} "
                                   "must be non-negative integers; the index is corrupt (rerun its stage)")  # fmt: skip
        entries.append(ShardEntry(str(shard_dir / split / name), name, count, size))
    if url is not None:
        if "{path}" not in url:
            raise ShardFormatError(f"shard URL template {url!r} has no '{{path}}' placeholder (e.g. https://host/dir/{{path}})")
        return [ShardEntry(url.replace("{path}", f"{split}/{e.file}"), e.file, e.num_samples, e.bytes) for e in entries]
    bad = []
    for e in entries:
        p = Path(e.path)
        if not p.is_file():
            raise ShardFormatError(f"shard {p} listed in {shard_dir}/index.json is missing")
        if check_sizes and e.bytes is not None and p.stat().st_size != e.bytes:
            bad.append(f"{p} is {p.stat().st_size} bytes, index.json records {e.bytes}")
    if bad:
        raise ShardSizeError(
            f"{len(bad)} shard(s) of {shard_dir} are truncated or were replaced: " + "; ".join(bad[:5])
            + ("; ..." if len(bad) > 5 else "") + f". Restore them with `dvc checkout {shard_dir}` (or `dvc pull`), "
            "or rerun the stage that wrote them."
        )  # fmt: skip
    return entries


def shard_paths(shard_dir: Union[str, Path], split: str, fmt: str = INDEX_FORMAT, url: Optional[str] = None) -> list[str]:
    """The shard files (or URLs) of ``split``, in index order, checked as :func:`shard_entries` does."""
    return [e.path for e in shard_entries(shard_dir, split, fmt, url)]


def select_ordinals(total: int, limit: Optional[int], seed: int, split: str) -> Optional[set[int]]:
    """Seeded subset of sample ordinals (position in shard order) of a split; None = all."""
    if limit is None or limit >= total:
        return None
    rng = np.random.default_rng([seed, {"train": 0, "val": 1, "holdout": 2}[split]])
    return set(rng.choice(total, size=limit, replace=False).tolist())


IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # PIL's ways of saying "broken"


def decode_image(data: bytes, mode: str = "RGB", where: str = "image") -> Image.Image:
    """Decode image bytes (converted to ``mode`` unless empty); :class:`ShardFormatError` naming ``where``
    (``decode_sample``'s ``"sample <key> in <shard>"``) when they do not decode."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert(mode) if mode and img.mode != mode else img
    except IMAGE_ERRORS as exc:
        raise ShardFormatError(f"{where}: undecodable image ({image_error(exc)})") from None


def decode_truth(data: bytes, where: str) -> np.ndarray:
    """A ``truth.png`` member (a ground-truth part mask) as ``uint8 [H, W]`` part ids. Strict: an 8-bit
    grayscale (mode L) PNG and nothing else, since any conversion (palette, RGB, 16-bit, or the 1/2/4-bit
    grayscale Pillow scales up to mode L) would invent ids; otherwise a :class:`ShardFormatError` naming
    ``where`` and the member."""
    try:
        img = Image.open(io.BytesIO(data))
        # the stored sample format, known before decoding (a tile's args: a raw mode, or a tuple led by one)
        raw_modes = {str(t[3] if isinstance(t[3], str) else t[3][0]) for t in img.tile}
        if img.format == "PNG" and img.mode == "L" and raw_modes == {"L"}:
            img.load()
            return np.array(img, dtype=np.uint8)
    except IMAGE_ERRORS as exc:
        raise ShardFormatError(f"{where}: undecodable truth.png ({image_error(exc)})") from None
    raise ShardFormatError(f"{where}: truth.png is a {img.format} image of mode {img.mode} "
                           f"({'/'.join(sorted(raw_modes))} samples), expected an 8-bit grayscale (mode L) PNG of "
                           "part ids; the shards are corrupt (rerun prepare)")  # fmt: skip


def image_error(exc: BaseException) -> str:
    """PIL's message without object addresses (``<_io.BytesIO object at 0x...>``): the same damage gives
    the same text, run after run."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the image bytes", str(exc)) or type(exc).__name__


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
    out = {"__key__": key, "__url__": url, "image": sample[image_keys[0]], "ext": image_keys[0], "cls": label,
           "where": where}
    out["json"] = meta
    if "parts.npy" in sample:
        try:
            out["parts"] = read_npy_uint8(sample["parts.npy"])
        except ValueError as exc:
            raise ShardFormatError(f"{where}: malformed parts.npy ({exc})") from None
    if "attn.npy" in sample:
        try:
            out["attention"] = read_npy_float16(sample["attn.npy"])
        except ValueError as exc:
            raise ShardFormatError(f"{where}: malformed attn.npy ({exc})") from None
    return out


_NPY_UINT8_HEADER = re.compile(rb"\{'descr': '\|u1', 'fortran_order': False, 'shape': \((\d+),(?: (\d+))?\), \} *\n")
_NPY_FLOAT16_HEADER = re.compile(rb"\{'descr': '<f2', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \} *\n")


def _npy_data(data: bytes, header: re.Pattern, itemsize: int, what: str) -> tuple[tuple[int, ...], int]:
    """``(shape, data offset)`` of ``.npy`` bytes whose header fully matches ``header`` (its groups: the
    dimensions) and whose data is exactly ``itemsize`` bytes per element; ValueError otherwise."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy file")
    if data[6] not in (1, 2, 3):
        raise ValueError(f"unknown .npy format version {data[6]}")
    start = 10 if data[6] == 1 else 12  # format 1.0: 2-byte header length; 2.0 and 3.0: 4 bytes
    end = start + int.from_bytes(data[8:start], "little")
    if end > len(data):
        raise ValueError(f"truncated: the header runs to byte {end} of {len(data)}")
    match = header.fullmatch(data[start:end])
    if match is None:
        raise ValueError(f"header {data[start:end].strip()[:200]!r} is not that of {what}")
    shape = tuple(int(g) for g in match.groups() if g is not None)
    if len(data) - end != itemsize * math.prod(shape):
        raise ValueError(f"{len(data) - end} data bytes for shape {shape}")
    return shape, end


def read_npy_uint8(data: bytes) -> np.ndarray:
    """A 1-D or 2-D uint8 array (C order) from ``.npy`` bytes, as ``np.save`` writes it.

    Not ``np.load``: it parses the header with ``ast.literal_eval``, and CPython 3.11's AST builder
    keeps its recursion-depth bookkeeping in interpreter-wide state that is not reentrant (CPython
    gh-106905 and relatives); in pretrain's loader worker processes that surfaced as ``SystemError: AST
    constructor recursion depth mismatch`` in 3 of 25 runs of a test. This reader matches the one header form our part maps have and refuses anything else
    (other dtypes, Fortran order, object arrays) with a ValueError; nothing is parsed as Python."""
    shape, offset = _npy_data(data, _NPY_UINT8_HEADER, 1, "a 1-D or 2-D C-order uint8 array")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape).copy()


def read_npy_float16(data: bytes) -> np.ndarray:
    """A 2-D little-endian float16 array (C order, every value finite) from ``.npy`` bytes, as ``np.save``
    writes the attention maps; anything else (other dtypes or byte order, Fortran order, other ranks,
    object arrays, NaN or infinity, a length that does not match) is refused with a ValueError. Not
    ``np.load``, for the reasons :func:`read_npy_uint8` gives."""
    shape, offset = _npy_data(data, _NPY_FLOAT16_HEADER, 2, "a 2-D C-order little-endian float16 array")
    out = np.frombuffer(data, "<f2", offset=offset).reshape(shape).astype(np.float16)  # native order, a copy
    if not np.isfinite(out).all():
        bad = np.argwhere(~np.isfinite(out))[0]
        raise ValueError(f"{int((~np.isfinite(out)).sum())} non-finite value(s), the first {out[tuple(bad)]} at "
                         f"{tuple(int(i) for i in bad)}")  # fmt: skip
    return out


def iter_shard(path: str, expected: Optional[int] = None) -> Iterator[dict[str, Any]]:
    """The undecoded samples (bytes per entry) of one shard, in order.

    Raises :class:`ShardFormatError` naming the shard and the last sample read when the tar cannot be
    read on, or, with ``expected`` (the index's count), when it ends after a different number of
    samples: a truncated tar otherwise just ends early. A sample cut in half by the truncation comes
    out with entries missing, which :func:`decode_sample` reports by key."""
    n, last = 0, None
    stream = wds.WebDataset([path], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    try:
        for sample in stream:
            n, last = n + 1, sample.get("__key__")
            yield sample
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        why = exc.args[0] if exc.args else type(exc).__name__  # webdataset appends its file object to args
        raise ShardFormatError(f"shard {path}: unreadable after {n} sample(s) (last key {last!r}): {why}. It is "
                               "corrupt or truncated: restore it (dvc checkout / dvc pull) or rerun its stage") from None
    if expected is not None and n != expected:
        raise ShardFormatError(f"shard {path}: ended after {n} sample(s) (last key {last!r}) but index.json records "
                               f"{expected}: it is truncated or was replaced; restore it (dvc checkout / dvc pull) or "
                               "rerun its stage")  # fmt: skip


def iter_raw_samples(paths: list[str], counts: Optional[list[int]] = None) -> Iterator[dict[str, Any]]:
    """Iterate undecoded samples of ``paths`` in order (single process, no shuffling); ``counts``: the
    index's sample count of each shard, checked (see :func:`iter_shard`)."""
    for i, path in enumerate(paths):
        yield from iter_shard(path, None if counts is None else counts[i])


def iter_samples(paths: list[str], counts: Optional[list[int]] = None) -> Iterator[dict[str, Any]]:
    """Iterate decoded samples of ``paths`` in order (single process, no shuffling)."""
    for sample in iter_raw_samples(paths, counts):
        yield decode_sample(sample)
