"""The ``train_parts`` stage's logic: fit the part learner (or take attention heads) and judge it.

Metrics (on the validation split's argmax maps, before any blur) for the chosen method and its
references, so a reader sees what the teacher's features add: parts from the teacher's attention
heads, k-means (N clusters) on the teacher's patch tokens, the same part learner trained on a
randomly initialised teacher of the same shape, and (for ``learned``) the learner with the other form
of part tokens. Where the prepared set has ground-truth part masks (``prepare.source:
synthetic_parts``), each also gets its part IoU (:func:`pipeline.parts.iou.class_part_iou`, pixel level,
the patch ids spread over their pixels) and its chance level (the same ids shuffled inside each image),
next to the IoU of the patch-grid oracle (each patch's majority true part: the ceiling of any
one-id-per-patch map). ``ground_truth`` takes that oracle as the parts (a control, on such sets only).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from pipeline.config.base import resolved_config
from pipeline.config.parts import PartsConfig
from pipeline.data.images import load_split, load_split_truth, normalize
from pipeline.data.shards import read_index
from pipeline.features import FeatureError, load_features, read_features_index
from pipeline.io import atomic_output_dir
from pipeline.parts.figures import part_overlay_grid
from pipeline.parts.iou import class_part_iou, part_confusion, patch_majority, upsample_ids
from pipeline.parts.metrics import (
    attention_head_parts,
    cls_attention,
    kmeans,
    segmentation_stats,
    shuffle_within_images,
)
from pipeline.resume import ResumeStore, fingerprint
from pipeline.parts.train import (
    build_part_learner,
    losses,
    part_ids,
    train_part_learner,
)
from pipeline.parts.model import TOKEN_FORMS
from pipeline.parts.load import PARTS_CHECKPOINT, KMeansParts, load_part_learner, parts_teacher, random_teacher
from pipeline.teacher.load import load_teacher

__all__ = ["build_parts", "load_part_learner", "parts_teacher", "KMeansParts", "PARTS_CHECKPOINT"]

log = logging.getLogger(__name__)
KMEANS_MAX_TOKENS = 50_000


def _order(all_keys: list[str], keys: np.ndarray, split: str) -> torch.Tensor:
    """Positions of ``keys`` (the features' order) in ``all_keys`` (the shards')."""
    pos = {k: i for i, k in enumerate(all_keys)}
    missing = [k for k in keys if k not in pos][:5]
    if missing:
        raise FeatureError(f"feature keys {missing} are not in the prepared {split} shards: features and shards differ")
    return torch.tensor([pos[k] for k in keys])


def _aligned_images(prepared_dir, split: str, size: int, keys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, all_keys = load_split(prepared_dir, split, size)
    order = _order(all_keys, keys, split)
    return images[order], labels[order]


def _part_iou(columns: dict[str, torch.Tensor], names: dict[str, str], truth: torch.Tensor, labels: torch.Tensor,
              num_ids: dict[str, int], classes: list[str], part_names: list[str], seed: int) -> dict[str, dict]:  # fmt: skip
    """Part IoU of every segmentation in ``columns`` (patch ids) against ``truth`` (pixels), and the oracle's; each
    also scored with its patches shuffled inside every image (``miou_shuffled``: its chance level)."""
    size, grid, p = truth.shape[-1], next(iter(columns.values())).shape[-1], len(part_names) - 1

    def score(ids: torch.Tensor, n: int) -> dict:
        out = class_part_iou(part_confusion(upsample_ids(ids, size), truth, n, p), labels, classes, part_names)
        chance = part_confusion(upsample_ids(shuffle_within_images(ids, seed), size), truth, n, p)
        return {**out, "miou_shuffled": class_part_iou(chance, labels, classes, part_names)["miou"]}

    out = {names[title]: score(ids.long(), num_ids[title]) for title, ids in columns.items()}
    out["patch_grid_oracle"] = score(patch_majority(truth, grid, p + 1), p + 1)
    return out


@torch.no_grad()
def _encode_tokens(vit, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 CLS ``[N, C]`` and patch tokens ``[N, L, C]``, exactly as the extract stage stores them."""
    cls, patches = [], []
    for i in range(0, len(images), batch_size):
        t = vit.forward_features(normalize(images[i : i + batch_size].float() / 255)).half()
        cls.append(t[:, 0])
        patches.append(t[:, vit.num_prefix_tokens :])
    return torch.cat(cls), torch.cat(patches)


@torch.no_grad()
def _attention_ids(vit, images: torch.Tensor, grid, batch_size: int = 256) -> torch.Tensor:
    out = [attention_head_parts(cls_attention(vit, normalize(images[i : i + batch_size].float() / 255)), grid)
           for i in range(0, len(images), batch_size)]  # fmt: skip
    return torch.cat(out).to(torch.uint8)


def _fit_kmeans(train_patches: torch.Tensor, k: int, seed: int, grid: tuple[int, int]) -> KMeansParts:
    tokens = train_patches.flatten(0, 1)
    g = torch.Generator().manual_seed(seed)
    if len(tokens) > KMEANS_MAX_TOKENS:
        tokens = tokens[torch.randperm(len(tokens), generator=g)[:KMEANS_MAX_TOKENS]]
    return KMeansParts(kmeans(tokens, k, seed=seed), grid)


def _kmeans_ids(train_patches: torch.Tensor, val_patches: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    side = int(round(val_patches.shape[1] ** 0.5))
    model = _fit_kmeans(train_patches, k, seed, (side, side))
    return model.part_logits(None, val_patches).argmax(1).to(torch.uint8)


def build_parts(
    cfg: PartsConfig, prepared_dir, teacher_dir, features_dir, out_dir, figure_path: Optional[Path] = None,
    device: Optional[torch.device] = None, log_epoch: Optional[Callable[[int, dict], None]] = None,
    references: bool = True, resume_dir: Optional[str | Path] = None, curve_rows: Optional[list] = None,
) -> dict:  # fmt: skip
    """Write ``out_dir/part_learner.pth`` (+ ``config.json``); return metrics; optionally draw the figure."""
    device = device or torch.device("cpu")
    index = read_features_index(features_dir)
    vit, tcfg, teacher_sha = load_teacher(teacher_dir)
    if index["teacher"]["teacher_sha256"] != teacher_sha:
        raise FeatureError(
            f"{features_dir} was extracted with teacher {index['teacher']['teacher_sha256'][:12]} but {teacher_dir} "
            f"holds teacher {teacher_sha[:12]}: rerun the extract stage (dvc repro extract)"
        )
    grid, dim = tuple(index["teacher"]["grid"]), index["teacher"]["dim"]
    prepared_index = read_index(prepared_dir)
    part_names = prepared_index.get("part_names")  # ground truth: only sources that have it
    if cfg.method == "ground_truth" and part_names is None:
        raise FeatureError(f"parts.method=ground_truth needs true part masks, but {prepared_dir}/index.json records "
                           "none: only prepare.source: synthetic_parts writes them")  # fmt: skip
    n_parts = {"attention_heads": vit.blocks[-1].attn.num_heads,
               "ground_truth": len(part_names or [])}.get(cfg.method, cfg.num_parts)  # fmt: skip
    if n_parts > grid[0] * grid[1]:
        raise FeatureError(f"parts.num_parts={n_parts} exceeds the {grid[0] * grid[1]} patches of the {grid} grid")
    tr, va = load_features(features_dir, "train"), load_features(features_dir, "val")
    tr_cls, tr_patches = torch.from_numpy(tr["cls"]), torch.from_numpy(tr["patches"])
    va_cls, va_patches = torch.from_numpy(va["cls"]), torch.from_numpy(va["patches"])
    tr_images, _ = _aligned_images(prepared_dir, "train", tcfg.img_size, tr["key"])
    va_images, va_labels = _aligned_images(prepared_dir, "val", tcfg.img_size, va["key"])
    truth = None
    if part_names is not None:
        truth, truth_keys = load_split_truth(prepared_dir, "val", tcfg.img_size)
        truth = truth[_order(truth_keys, va["key"], "val")]

    metrics: dict = {"method": cfg.method, "num_parts": n_parts}
    stores: dict[str, ResumeStore] = {}
    if resume_dir is not None:  # each training (the method's, the random-teacher's, the other tokens') resumes apart
        key = fingerprint(resolved_config(cfg, "parts"), teacher_sha, json.dumps(index, sort_keys=True),
                          (Path(prepared_dir) / "index.json").read_bytes(),
                          *[p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py"))])  # fmt: skip
        stores = {name: ResumeStore(Path(resume_dir) / name, key) for name in ("method", "reference", "other_tokens")}
    columns: dict[str, torch.Tensor] = {}
    model, extra = None, {}
    if cfg.method in ("learned", "random_teacher"):
        if cfg.method == "random_teacher":  # the ablation: the same learner on a random ViT's tokens
            rand_vit = random_teacher(tcfg, cfg.seed)
            (tr_cls, tr_patches), (va_cls, va_patches) = _encode_tokens(rand_vit, tr_images), _encode_tokens(rand_vit, va_images)
            extra["teacher_state"] = {k: v.contiguous() for k, v in sorted(rand_vit.state_dict().items())}
        model = build_part_learner(cfg, dim, grid, tcfg.img_size)
        metrics["train"] = train_part_learner(model, tr_cls, tr_patches, tr_images, cfg, device, log_epoch,
                                              store=stores.get("method"), curve_rows=curve_rows)  # fmt: skip
        model.cpu().eval()
        with torch.no_grad():
            metrics["val_recon_l1"] = losses(model, va_cls, va_patches, va_images, cfg)["recon"].item()
        title = f"learned parts ({cfg.tokens})" if cfg.method == "learned" else "random-teacher parts (method)"
        columns[title] = part_ids(model, va_cls, va_patches)
    elif cfg.method == "kmeans":
        model = _fit_kmeans(tr_patches, n_parts, cfg.seed, grid)
        columns["k-means parts (method)"] = model.part_logits(None, va_patches).argmax(1).to(torch.uint8)
    elif cfg.method == "ground_truth":  # the control: nothing learned, each patch's majority true part
        columns["true parts (method)"] = patch_majority(truth, grid[0], n_parts).to(torch.uint8)
    attention = _attention_ids(vit, va_images, grid)
    columns["attention heads"] = attention
    if references:
        if cfg.method != "kmeans":
            columns["k-means"] = _kmeans_ids(tr_patches, va_patches, n_parts, cfg.seed)
        if cfg.method == "learned":
            rand_vit = random_teacher(tcfg, cfg.seed)
            r_tr, r_va = _encode_tokens(rand_vit, tr_images), _encode_tokens(rand_vit, va_images)
            rand_model = build_part_learner(cfg, dim, grid, tcfg.img_size)
            train_part_learner(rand_model, *r_tr, tr_images, cfg, device, desc="train parts (random teacher)",
                               store=stores.get("reference"))  # fmt: skip
            columns["random-teacher parts"] = part_ids(rand_model.cpu(), *r_va)
            other = next(t for t in TOKEN_FORMS if t != cfg.tokens)  # the same learner, the other part tokens
            other_model = build_part_learner(cfg, dim, grid, tcfg.img_size, tokens=other)
            train_part_learner(other_model, tr_cls, tr_patches, tr_images, cfg, device, desc=f"train parts ({other})",
                               store=stores.get("other_tokens"))  # fmt: skip
            columns[f"learned parts ({other})"] = part_ids(other_model.cpu(), va_cls, va_patches)
    heads = vit.blocks[-1].attn.num_heads
    names = {"k-means": "kmeans", "random-teacher parts": "random_teacher",
             "random-teacher parts (method)": "parts", "k-means parts (method)": "parts", "true parts (method)": "parts",
             "attention heads": "parts" if cfg.method == "attention_heads" else "attention_heads",
             **{f"learned parts ({t})": "parts" if t == cfg.tokens else f"parts_{t}" for t in TOKEN_FORMS}}  # fmt: skip
    num_ids = {title: heads if title == "attention heads" else n_parts for title in columns}
    for title, ids in columns.items():
        metrics[names[title]] = segmentation_stats(ids.long(), num_ids[title], cfg.seed)
    if truth is not None:
        scores = _part_iou(columns, names, truth, va_labels, num_ids, prepared_index["classes"], part_names,
                           cfg.seed)  # fmt: skip
        for name, score in scores.items():
            metrics.setdefault(name, {})["part_iou"] = score

    meta = {"method": cfg.method, "dim": dim, "grid": list(grid), "num_parts": n_parts, "image_size": tcfg.img_size,
            "decoder_channels": cfg.decoder_channels, "style_dim": cfg.style_dim, "blur_size": cfg.blur_size,
            "blur_sigma": cfg.blur_sigma, "temperature": cfg.temperature, "tokens": cfg.tokens,
            "teacher_sha256": teacher_sha}  # fmt: skip
    with atomic_output_dir(out_dir) as tmp:
        state = model.state_dict() if model is not None else {}
        torch.save({"state_dict": state, "meta": meta, **extra}, tmp / PARTS_CHECKPOINT)
        (tmp / "config.json").write_bytes(resolved_config(cfg, "parts"))
    if figure_path is not None:
        shown = {t: ids[:8] for t, ids in columns.items()} | ({} if truth is None else {"ground truth": truth[:8]})
        part_overlay_grid(va_images[:8], shown, figure_path)
    for store in stores.values():
        store.clear()  # the outputs are written: nothing to resume
    return metrics
