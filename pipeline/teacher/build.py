"""The ``teacher`` stage's logic: load an official iBOT checkpoint or train one, then measure it.

Either way the result is saved in iBOT's official ``checkpoint_teacher.pth`` format, so one loader
serves every later stage, and its quality is measured by k-NN accuracy next to two references
(a randomly initialised ViT of the same shape, and raw pixels).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pipeline import distributed as D
from pipeline.config.base import resolved_config
from pipeline.config.teacher import TeacherConfig
from pipeline.data.images import load_split
from pipeline.data.shards import read_index
from pipeline.eval.encode import encode_splits, vit_encoder
from pipeline.eval.knn import knn_accuracy
from pipeline.io import atomic_output_dir, file_sha256, json_bytes
from pipeline.resume import ResumeStore, fingerprint
from pipeline.models.checkpoint import (
    CheckpointError,
    load_backbone,
    load_checkpoint_file,
    save_backbone,
)
from pipeline.teacher.load import CHECKPOINT_NAME, load_teacher, teacher_vit
from pipeline.teacher.train import train_ibot

__all__ = ["build_teacher", "teacher_vit", "load_teacher"]

log = logging.getLogger(__name__)
KNN_PIXEL_SIZE = 32  # the raw-pixels reference is area-resized to at most 32 x 32 (ImageNet: 3,072 numbers)


def build_teacher(
    cfg: TeacherConfig,
    prepared_dir: str | Path,
    out_dir: str | Path,
    device: Optional[torch.device] = None,
    log_step: Optional[Callable[[int, dict], None]] = None,
    max_steps: Optional[int] = None,
    resume_dir: Optional[str | Path] = None,
    curve_rows: Optional[list] = None,
) -> dict:
    """Write ``out_dir/checkpoint_teacher.pth`` (+ ``config.json``) and return the quality metrics."""
    device = device or D.device_for_rank()
    read_index(prepared_dir)  # a missing shard set fails here, before anything is loaded
    if cfg.init == "checkpoint":
        load_checkpoint_file(cfg.checkpoint)  # unreadable/unsafe file fails before the images are decoded
        vit = load_backbone(teacher_vit(cfg), cfg.checkpoint)  # wrong architecture fails here too
    D.init_distributed()
    if cfg.init == "train" and D.world_size() > 1:
        raise CheckpointError("teacher.init: train runs in one process (the images are held in memory): run the "
                              "teacher stage without torchrun; its k-NN check of a checkpoint does use every rank")  # fmt: skip
    metrics: dict = {"init": cfg.init}
    provenance: dict = {"source": "trained here (teacher.init: train)"}
    store: Optional[ResumeStore] = None
    if cfg.init == "checkpoint":
        provenance = {"source": str(cfg.checkpoint), "source_sha256": file_sha256(cfg.checkpoint)}
    else:  # the in-pipeline teacher trains on the train split held in memory (small datasets)
        train_x, _, _ = load_split(prepared_dir, "train", cfg.img_size)
        if resume_dir is not None:  # a killed training continues from its last epoch
            code = [p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py"))]
            store = ResumeStore(resume_dir, fingerprint(resolved_config(cfg, "teacher"),
                                                        file_sha256(Path(prepared_dir) / "index.json"), *code))  # fmt: skip
        torch.manual_seed(cfg.train.seed)
        vit, stats = train_ibot(teacher_vit(cfg), train_x, cfg.train, device, log_step, max_steps, store, curve_rows)
        metrics["train"] = stats
        del train_x

    torch.manual_seed(cfg.train.seed + 12345)
    rand = teacher_vit(cfg)
    pixels = min(cfg.img_size, KNN_PIXEL_SIZE)
    encoders = {"teacher": vit_encoder(vit, device), "random_vit": vit_encoder(rand, device),
                "raw_pixels": lambda x: F.interpolate(x.float(), size=(pixels, pixels), mode="area").flatten(1)}  # fmt: skip
    feats, labels = encode_splits(prepared_dir, cfg.img_size, encoders, cfg.eval_batch_size, desc="k-NN",
                                  limit=cfg.knn_limit, seed=cfg.train.seed)  # fmt: skip
    if not D.is_main():  # the ranks shared the encoding; rank 0 writes
        D.cleanup()
        return {}
    for name, f in feats.items():
        metrics[f"knn_{name}"] = knn_accuracy(f["train"], labels["train"], f["val"], labels["val"], cfg.knn_k)
    metrics["knn_images"] = {split: len(y) for split, y in labels.items()}
    metrics["knn_margin_over_random"] = metrics["knn_teacher"] - metrics["knn_random_vit"]
    log.info(
        "k-NN top-1 (k=%d): teacher %.4f, random ViT %.4f, raw pixels %.4f",
        cfg.knn_k, metrics["knn_teacher"], metrics["knn_random_vit"], metrics["knn_raw_pixels"],
    )  # fmt: skip
    with atomic_output_dir(out_dir) as tmp:
        save_backbone(vit, tmp / CHECKPOINT_NAME, dtype=getattr(torch, cfg.save_dtype))
        (tmp / "config.json").write_bytes(resolved_config(cfg, "teacher"))
        (tmp / "meta.json").write_bytes(json_bytes(provenance))  # provenance stays out of the metrics
    if store is not None:
        store.clear()  # the outputs are written: nothing to resume
    D.cleanup()
    return metrics
