"""The ``export_parts`` stage's logic: argmax part maps of every prepared image, in new shards.

Features are recomputed by the teacher from each image rather than read from the feature shards:
``extract`` may keep only a subset (at ImageNet scale features for every image would take ~194 GB),
while every image needs a map. The recomputed tokens are cast to fp16 exactly as ``extract`` stores
them and batched per shard like ``extract``, so with the same batch size both give the same map.

In the same batches the teacher's last-block CLS-to-patch attention (mean over heads) is stored
beside each map, for attention-guided masking (AttMask): computed once here, so pretraining never
runs the teacher. It is always the real teacher's (``random_teacher`` only changes the part maps).
For ``ground_truth`` the map is each patch's majority part in the sample's ``truth.png`` (its true part mask,
through ``to_square``'s geometry): no teacher features, the attention only.

Output (``out_dir``)::

    index.json    format, classes, grid, num_parts, method, teacher sha256, attention, per split shards
    train/train-000000.tar ...   the prepared samples unchanged (image bytes, cls, json)
    val/val-000000.tar ...       plus ``parts.npy``: uint8 [grid, grid] part ids in [0, N)
                                 and ``attn.npy``: float16 [grid, grid] CLS attention (softmax weights
                                 over all tokens, so on the teacher grid the patches' sum to 1 less the
                                 CLS token's own; resized bilinearly up or by area down to the grid)
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import distributed as D
from pipeline.config.base import resolved_config
from pipeline.config.parts import ExportPartsConfig
from pipeline.data.images import normalize, to_square, truth_to_square
from pipeline.data.shards import (
    PARTS_FORMAT,
    ShardFormatError,
    decode_image,
    decode_sample,
    decode_truth,
    iter_raw_samples,
    read_index,
    shard_entries,
    write_tar,
)
from pipeline.features import FeatureError, run_sharded_own_temporary
from pipeline.io import ensure_free_space, file_sha256, json_bytes
from pipeline.parts.iou import patch_majority
from pipeline.parts.load import PARTS_CHECKPOINT, load_part_learner, parts_teacher
from pipeline.parts.metrics import cls_attention, tokens_and_cls_attention
from pipeline.teacher.load import load_teacher

__all__ = ["PARTS_FORMAT", "ATTENTION_SOURCE", "export_parts", "soft_part_maps", "attention_maps"]

ATTENTION_SOURCE = "teacher last-block CLS attention, mean over heads"

log = logging.getLogger(__name__)


@torch.no_grad()
def soft_part_maps(vit, learner, meta: dict, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Soft part maps ``[B, N, H, W]`` on the teacher grid for normalised images ``x`` (``tokens``: ``vit``'s
    ``forward_features(x)`` when already computed)."""
    grid = tuple(meta["grid"])
    if meta["method"] == "attention_heads":
        attn = cls_attention(vit, x)  # [B, heads, L]
        return attn.view(attn.shape[0], attn.shape[1], *grid).float()
    tokens = (vit.forward_features(x) if tokens is None else tokens).to(torch.float16)  # as stored by extract
    prefix = vit.num_prefix_tokens
    return learner.part_logits(tokens[:, 0].float(), tokens[:, prefix:].float()).softmax(1)


@torch.no_grad()
def attention_maps(vit, x: torch.Tensor, teacher_grid: tuple[int, int], grid: int,
                   attention: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``vit``'s last-block CLS-to-patch attention, mean over heads, on a ``grid x grid`` map ``float32
    [B, grid, grid]``: bilinear when upsampling the teacher grid, area (adaptive average) when downsampling.
    ``attention``: :func:`cls_attention` of ``x`` when already computed."""
    attn = (cls_attention(vit, x) if attention is None else attention).float().mean(1)  # [B, L]
    maps = attn.view(attn.shape[0], 1, *teacher_grid)
    if teacher_grid[0] < grid:
        maps = F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False)
    elif teacher_grid[0] > grid:
        maps = F.adaptive_avg_pool2d(maps, (grid, grid))
    return maps[:, 0]


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def export_parts(cfg: ExportPartsConfig, prepared_dir, teacher_dir, parts_dir, out_dir) -> dict:
    """Write part shards for both splits; under ``torchrun`` each rank takes every world-th shard."""
    prepared_dir = Path(prepared_dir)
    index = read_index(prepared_dir)
    vit, tcfg, teacher_sha = load_teacher(teacher_dir)
    learner, meta = load_part_learner(Path(parts_dir) / PARTS_CHECKPOINT)
    tokens_vit = parts_teacher(vit, tcfg, parts_dir)  # the random ViT for parts.method=random_teacher
    if meta["teacher_sha256"] != teacher_sha:
        raise FeatureError(
            f"the part learner in {parts_dir} was trained on teacher {meta['teacher_sha256'][:12]} but {teacher_dir} "
            f"holds teacher {teacher_sha[:12]}: rerun train_parts (dvc repro train_parts)"
        )
    grid = cfg.grid or meta["grid"][0]
    if tcfg.img_size % grid:
        raise FeatureError(f"export_parts.grid={grid} does not divide the image size {tcfg.img_size}")
    if meta["num_parts"] > grid * grid:
        raise FeatureError(f"num_parts={meta['num_parts']} exceeds the {grid * grid} patches of a {grid}x{grid} grid")
    D.init_distributed()
    device = D.device_for_rank()
    vit.to(device).eval()
    tokens_vit.to(device).eval()
    if learner is not None:
        learner.to(device).eval()

    teacher_grid = tuple(vit.patch_embed.grid_size)  # the grid of the attention the teacher gives

    def maps_for(images: list[np.ndarray], truths: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Part ids ``uint8 [B, grid, grid]`` and attention ``float16 [B, grid, grid]`` of a batch (``truths``: its
        true part masks on the images' pixels, for ``ground_truth``)."""
        x = normalize(torch.from_numpy(np.stack(images)).to(device).float() / 255)
        if truths is not None:  # ground_truth: each patch's majority true part; the teacher gives the attention only
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                attn = attention_maps(vit, x, teacher_grid, grid)
            ids = patch_majority(torch.from_numpy(np.stack(truths)), grid, meta["num_parts"])
            return ids.to(torch.uint8).numpy(), attn.to(torch.float16).cpu().numpy()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if tokens_vit is vit and meta["method"] != "attention_heads":  # one teacher pass gives both
                tokens, weights = tokens_and_cls_attention(vit, x)
                soft = soft_part_maps(vit, learner, meta, x, tokens).float()
                attn = attention_maps(vit, x, teacher_grid, grid, weights)
            else:
                soft = soft_part_maps(tokens_vit, learner, meta, x).float()
                attn = attention_maps(vit, x, teacher_grid, grid)
        if soft.shape[-1] != grid:
            soft = F.interpolate(soft, size=(grid, grid), mode="bilinear", align_corners=False)
        return soft.argmax(1).to(torch.uint8).cpu().numpy(), attn.to(torch.float16).cpu().numpy()

    def work(job, tmp: Path, bar) -> None:
        split, shard = job
        (tmp / split).mkdir(exist_ok=True)
        raw = list(iter_raw_samples([shard.path], [shard.num_samples]))
        ids, attn = [np.zeros((0, grid, grid), np.uint8)], [np.zeros((0, grid, grid), np.float16)]
        for start in range(0, len(raw), cfg.batch_size):
            batch = raw[start : start + cfg.batch_size]
            decoded = [decode_sample(s) for s in batch]
            truths = [_truth(s, d["where"]) for s, d in zip(batch, decoded)] if meta["method"] == "ground_truth" else None
            m, a = maps_for([to_square(decode_image(d["image"], where=d["where"]), tcfg.img_size) for d in decoded], truths)
            ids.append(m)
            attn.append(a)
            bar.update(len(batch))
        samples = ({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
                   | {"parts.npy": _npy(m), "attn.npy": _npy(a)}
                   for s, m, a in zip(raw, np.concatenate(ids), np.concatenate(attn)))  # fmt: skip
        write_tar(tmp / split / shard.file, samples)

    def _truth(raw: dict, where: str) -> np.ndarray:
        if "truth.png" not in raw:
            raise ShardFormatError(f"{where}: no truth.png, which parts.method=ground_truth reads: only prepare.source: "
                                   "synthetic_parts writes true part masks")  # fmt: skip
        return truth_to_square(decode_truth(raw["truth.png"], where), tcfg.img_size)

    entries = {split: shard_entries(prepared_dir, split) for split in ("train", "val")}  # checked names and sizes
    jobs = [(split, e) for split in ("train", "val") for e in entries[split]]
    sizes = [e.num_samples for _, e in jobs]

    def finalize(tmp: Path) -> dict:
        splits = {}
        for split in ("train", "val"):
            shards = []
            for e in entries[split]:
                path = tmp / split / e.file
                shards.append({"file": e.file, "num_samples": e.num_samples, "sha256": file_sha256(path),
                               "bytes": path.stat().st_size})  # fmt: skip
            splits[split] = {"num_samples": index["splits"][split]["num_samples"], "shards": shards,
                             "class_counts": index["splits"][split]["class_counts"]}  # fmt: skip
        out_index = {"format": PARTS_FORMAT, "classes": index["classes"], "grid": [grid, grid],
                     "num_parts": meta["num_parts"], "method": meta["method"], "teacher_sha256": teacher_sha,
                     "attention": {"source": ATTENTION_SOURCE, "dtype": "float16", "grid": [grid, grid]},
                     "splits": splits}  # fmt: skip
        (tmp / "index.json").write_bytes(json_bytes(out_index))
        (tmp / "config.json").write_bytes(resolved_config(cfg, "export_parts"))
        return {"grid": grid, "num_parts": meta["num_parts"], **{f"{s}_samples": v["num_samples"] for s, v in splits.items()}}

    source_bytes = sum(e.bytes or 0 for _, e in jobs)
    # per sample a parts.npy and an attn.npy member (each a 512-byte header + its .npy padded to 512); per
    # shard the tar's final record (tarfile pads an archive to RECORDSIZE); index.json and config.json
    per_sample = sum(512 + -(-len(_npy(np.zeros((grid, grid), t))) // 512) * 512 for t in (np.uint8, np.float16))
    needed = source_bytes + per_sample * sum(sizes) + tarfile.RECORDSIZE * len(jobs) + (64 << 10)
    ensure_free_space(out_dir, needed, "the part shards (the prepared images + maps)")
    return run_sharded_own_temporary(Path(out_dir), jobs, work, finalize, sizes, desc="export parts")
