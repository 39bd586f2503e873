"""Teacher feature shards: CLS + patch tokens of a frozen ViT per prepared image, as Arrow IPC files.

Why Arrow IPC (not Parquet): the part learner reads these features many times; IPC files are
memory-mapped and read without decoding or copying, while Parquet's encodings and compression
gain little on fp16 activations and cost a decode on every read.

Layout (``out_dir``)::

    index.json                     format, teacher (arch, grid, dim, checkpoint sha256), rows per file
    config.json                    resolved extract parameters
    train/train-000000.arrow ...   one file per input shard (so the result does not depend on the
    val/val-000000.arrow ...       number of processes that wrote it)

Columns: ``key`` (string), ``label`` (int32), ``cls_token`` (fixed_size_list<float16>[C]),
``patch_tokens`` (fixed_size_list<float16>[H*W*C], row-major ``[H*W, C]``). The schema metadata
repeats the teacher description.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline import distributed as D
from pipeline.config.base import resolved_config
from pipeline.config.extract import ExtractConfig
from pipeline.data.images import normalize, to_square
from pipeline.data.shards import decode_image, iter_samples, read_index, select_ordinals, shard_entries
from pipeline.errors import PipelineError
from pipeline.io import ensure_free_space, json_bytes, remove_stale_temporaries
from pipeline.sharded import run_sharded
from pipeline.teacher.load import load_teacher

__all__ = ["FEATURES_FORMAT", "FeatureError", "extract_features", "read_features_index", "load_features",
           "run_sharded_own_temporary"]

FEATURES_FORMAT = "semmae-features/1"
log = logging.getLogger(__name__)


FEATURE_FILE = re.compile(r"^(train|val)-[0-9]{6}\.arrow$")

class FeatureError(PipelineError):
    """Feature shards are missing, inconsistent or from another teacher."""


def _schema(dim: int, tokens: int, meta: dict) -> pa.Schema:
    return pa.schema(
        [
            ("key", pa.string()),
            ("label", pa.int32()),
            ("cls_token", pa.list_(pa.float16(), dim)),
            ("patch_tokens", pa.list_(pa.float16(), tokens * dim)),
        ],
        metadata={"semmae": json.dumps(meta, sort_keys=True)},
    )


def _batch(keys: list[str], labels: list[int], cls: np.ndarray, patches: np.ndarray, schema: pa.Schema) -> pa.RecordBatch:
    dim = cls.shape[1]
    return pa.record_batch(
        [
            pa.array(keys, pa.string()),
            pa.array(labels, pa.int32()),
            pa.FixedSizeListArray.from_arrays(pa.array(cls.reshape(-1)), dim),
            pa.FixedSizeListArray.from_arrays(pa.array(patches.reshape(-1)), patches.shape[1] * dim),
        ],
        schema=schema,
    )


def run_sharded_own_temporary(out_dir: Path, jobs: Sequence, work: Callable, finalize: Callable[[Path], dict],
                              sizes: Sequence[int], desc: str) -> dict:
    """:func:`run_sharded` into this run's own temporary ``.<out>.tmp-<pid>`` (rank 0's pid, the same on every
    rank; call after ``D.init_distributed``), renamed over ``out_dir`` by rank 0 at the end. Two runs on one
    output then never touch each other's files (the last to finish leaves its output), and the temporary of
    a killed run is removed by the next run, as :func:`pipeline.io.atomic_output_dir` does for one process."""
    pid = int(D.broadcast(torch.tensor([os.getpid()], dtype=torch.int64), 0).item())
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{pid}")
    main = D.is_main()  # asked now: run_sharded leaves the process group, after which every rank is "rank 0"
    if main:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
    try:
        result = run_sharded(staging / out_dir.name, jobs, work, finalize, sizes, desc)
        if main:
            _replace_dir(staging / out_dir.name, out_dir)
        return result
    finally:
        if main:
            shutil.rmtree(staging, ignore_errors=True)


def _replace_dir(new: Path, out_dir: Path) -> None:
    """Rename ``new`` over ``out_dir`` (a directory cannot be renamed over a non-empty one: the old one is
    moved aside first). Another run may publish between the two renames: then move its output aside too."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    try:
        for _ in range(100):
            shutil.rmtree(old, ignore_errors=True)
            try:
                os.replace(out_dir, old)
            except FileNotFoundError:
                pass
            try:
                os.replace(new, out_dir)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        raise FeatureError(f"{out_dir} kept being replaced by other runs: run one `dvc repro` at a time")
    finally:
        shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def _extract_shard(vit, shard: str, count: int, wanted: Optional[set[int]], first_ordinal: int, out: Path,
                   schema: pa.Schema, img_size: int, batch_size: int, device: torch.device, bar) -> int:  # fmt: skip
    prefix = vit.num_prefix_tokens
    rows = 0
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        buf: list[tuple[str, int, np.ndarray]] = []

        def flush() -> None:
            x = torch.from_numpy(np.stack([b[2] for b in buf])).to(device).float() / 255
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                tokens = vit.forward_features(normalize(x))  # [B, 1 + L, C]
            tokens = tokens.to(torch.float16).cpu().numpy()
            writer.write_batch(_batch([b[0] for b in buf], [b[1] for b in buf], tokens[:, 0], tokens[:, prefix:], schema))
            bar.update(len(buf))
            buf.clear()

        for i, sample in enumerate(iter_samples([shard], [count])):
            if wanted is not None and first_ordinal + i not in wanted:
                continue
            buf.append((sample["__key__"], sample["cls"], to_square(decode_image(sample["image"], where=sample["where"]), img_size)))
            rows += 1
            if len(buf) == batch_size:
                flush()
        if buf:
            flush()
    return rows


def extract_features(cfg: ExtractConfig, prepared_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path) -> dict:
    """Write feature shards for ``cfg.splits``; under ``torchrun`` each rank takes every world-th shard."""
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    index = read_index(prepared_dir)
    vit, tcfg, teacher_sha = load_teacher(teacher_dir)  # fails on a bad teacher before any output
    D.init_distributed()
    device = D.device_for_rank()
    vit.eval().to(device)
    grid = list(vit.patch_embed.grid_size)
    meta = {"format": FEATURES_FORMAT, "arch": tcfg.arch, "img_size": tcfg.img_size, "patch_size": tcfg.patch_size,
            "grid": grid, "dim": vit.embed_dim, "teacher_sha256": teacher_sha}  # fmt: skip
    schema = _schema(vit.embed_dim, grid[0] * grid[1], meta)

    jobs, sizes = [], []
    for split in cfg.splits:
        shards = shard_entries(prepared_dir, split)  # names and sizes checked before any compute
        wanted = select_ordinals(index["splits"][split]["num_samples"], cfg.limit, cfg.seed, split)
        first = np.cumsum([0] + [s.num_samples for s in shards])
        counts = np.diff(first if wanted is None else np.searchsorted(np.sort(list(wanted)), first))
        for j, shard in enumerate(shards):
            jobs.append((split, shard, wanted, int(first[j])))
            sizes.append(int(counts[j]))
    tokens = grid[0] * grid[1] + 1
    ensure_free_space(out_dir, sum(sizes) * tokens * vit.embed_dim * 2 + 4096 * len(jobs), "the feature shards (extract.limit)")

    def work(job, tmp: Path, bar) -> None:
        split, shard, wanted, first = job
        (tmp / split).mkdir(exist_ok=True)
        out = tmp / split / shard.file.replace(".tar", ".arrow")
        _extract_shard(vit, shard.path, shard.num_samples, wanted, first, out, schema, tcfg.img_size, cfg.batch_size, device, bar)

    def finalize(tmp: Path) -> dict:
        splits = {}
        for split in cfg.splits:
            files = []
            for path in sorted((tmp / split).glob("*.arrow")):
                with pa.memory_map(str(path)) as src:
                    files.append({"file": path.name, "num_rows": pa.ipc.open_file(src).read_all().num_rows})
            splits[split] = {"num_rows": sum(f["num_rows"] for f in files), "files": files}
        (tmp / "index.json").write_bytes(json_bytes({"format": FEATURES_FORMAT, "teacher": meta, "splits": splits}))
        (tmp / "config.json").write_bytes(resolved_config(cfg, "extract"))
        return {"dim": vit.embed_dim, "grid": grid, **{f"{s}_rows": v["num_rows"] for s, v in splits.items()}}

    return run_sharded_own_temporary(out_dir, jobs, work, finalize, sizes, desc="extract")


def read_features_index(features_dir: str | Path) -> dict:
    return read_index(features_dir, FEATURES_FORMAT)


def load_features(features_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """All rows of ``split``: ``key [N]``, ``label [N]``, ``cls [N, C]`` and ``patches [N, L, C]`` (fp16)."""
    features_dir = Path(features_dir)
    index = read_features_index(features_dir)
    if split not in index["splits"]:
        raise FeatureError(f"{features_dir}/index.json has no split {split!r} (has {sorted(index['splits'])})")
    tables = []
    for f in index["splits"][split]["files"]:
        name = f.get("file") if isinstance(f, dict) else None
        if not isinstance(name, str) or not FEATURE_FILE.match(name) or not name.startswith(split):
            raise FeatureError(f"{features_dir}/index.json: file name {name!r} in split {split!r} is not of the form "
                               f"{split}-NNNNNN.arrow; the index is corrupt (rerun dvc repro extract)")  # fmt: skip
        path = features_dir / split / name
        try:
            with pa.memory_map(str(path)) as src:
                tables.append(pa.ipc.open_file(src).read_all())
        except (OSError, pa.ArrowException) as exc:
            raise FeatureError(f"feature shard {path} is unreadable ({exc}): restore it (dvc checkout {features_dir}) "
                               "or rerun dvc repro extract") from None
        if tables[-1].num_rows != f.get("num_rows"):
            raise FeatureError(f"feature shard {path} holds {tables[-1].num_rows} rows, index.json records "
                               f"{f.get('num_rows')}: restore it (dvc checkout {features_dir}) or rerun dvc repro extract")
    table = pa.concat_tables(tables)
    dim = index["teacher"]["dim"]

    def matrix(column: str) -> np.ndarray:
        col = table.column(column).combine_chunks()
        return col.values.to_numpy(zero_copy_only=False).reshape(table.num_rows, -1, dim).copy()

    return {
        "key": np.array(table.column("key").to_pylist()),
        "label": table.column("label").to_numpy(),
        "cls": matrix("cls_token")[:, 0],
        "patches": matrix("patch_tokens"),
    }
