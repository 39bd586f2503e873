"""Linear probing, MAE's protocol: frozen encoder, CLS token after the final norm, BatchNorm1d
(affine=False) + Linear head trained with LARS, warm-up + per-iteration cosine lr.

Two modes give the same head when augmentation is off (tested): ``cached`` encodes every image
once and trains on the stored features (the default on CPU: the encoder runs once instead of once
per epoch); ``online`` encodes each batch as it comes, which augmentation needs.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config.linprobe import LinprobeConfig
from pipeline.data.augment import random_resized_crop
from pipeline.eval.knn import knn_accuracy
from pipeline.eval.lars import LARS
from pipeline.resume import ResumeStore
from pipeline.schedule import warmup_cosine

__all__ = ["probe_head", "train_probe", "evaluate_head", "topk_accuracy", "probe_features", "probe_cached", "Encoder"]

log = logging.getLogger(__name__)

# images uint8 [B, 3, S, S] -> features [B, D] (no grad), or None for features given directly
Encoder = Optional[Callable[[torch.Tensor], torch.Tensor]]


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(affine=False, eps=1e-6) + Linear with weights ~ trunc-normal(std 0.01), bias 0."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(1).float().mean())


@torch.no_grad()
def encode_all(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int,
               desc: str) -> torch.Tensor:  # fmt: skip
    out = [encode(images[i : i + batch_size]) for i in tqdm(range(0, len(images), batch_size), desc=desc,
                                                              unit="batch", mininterval=1.0)]  # fmt: skip
    return torch.cat(out)


def train_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, cfg: LinprobeConfig, device: torch.device,
    encode: Encoder = None, log_row: Optional[Callable[[int, dict], None]] = None, desc: str = "linprobe",
    store: Optional[ResumeStore] = None, curve_rows: Optional[list] = None,
) -> nn.Sequential:  # fmt: skip
    """Train a probe head on ``train_x``: features ``[N, D]`` (``encode=None``) or images ``uint8 [N, 3, S, S]``
    encoded batch by batch by ``encode`` (optionally augmented). Batch order is seeded by ``cfg.seed``.
    ``store``: the head, optimiser, generators and curves are saved at epoch ends and a killed run
    continues from there to the same head."""
    n = len(train_x)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs  # full batches only, as MAE (drop_last)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        dim = (encode(train_x[:2]) if encode is not None else train_x[:2]).shape[1]
    torch.manual_seed(cfg.seed)
    head = probe_head(dim, num_classes).to(device)
    opt = LARS(head.parameters(), lr=0.0, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
               trust_coefficient=cfg.trust_coefficient)  # fmt: skip
    total = steps_per_epoch * cfg.epochs
    start_epoch = 0
    state = store.load() if store is not None else None
    if state is not None:
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        aug_gen.set_state(state["aug_generator"])
        start_epoch = int(state["epoch"])
        if curve_rows is not None:
            curve_rows[:] = state["curves"]
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc=desc, unit="step", mininterval=1.0)
    for epoch in range(start_epoch, cfg.epochs):
        head.train()
        order = torch.randperm(n, generator=gen)
        loss_sum, correct = torch.zeros(()), 0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            lr = warmup_cosine(step / steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.peak_lr(), cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = order[i * bs : (i + 1) * bs]
            x = train_x[idx]
            if encode is not None:
                if cfg.augment:
                    x = (random_resized_crop(x.float(), x.shape[-1], tuple(cfg.crop_scale), aug_gen) + 0.5).clamp(0, 255)
                    x = x.to(torch.uint8)
                with torch.no_grad():
                    x = encode(x)
            y = train_y[idx].to(device)
            logits = head(x.to(device).float())
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().cpu()
            correct += int((logits.argmax(1) == y).sum())
            bar.update()
        stats = {"loss": float(loss_sum) / steps_per_epoch, "train_top1": correct / (steps_per_epoch * bs),
                 "lr": lr, "epoch": epoch + 1}  # fmt: skip
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
        if log_row is not None:
            log_row((epoch + 1) * steps_per_epoch, stats)
        if store is not None:
            store.save({"head": head.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                        "aug_generator": aug_gen.get_state(), "epoch": epoch + 1, "curves": list(curve_rows or [])})  # fmt: skip
    bar.close()
    return head.eval()


@torch.no_grad()
def evaluate_head(head: nn.Sequential, features: torch.Tensor, labels: torch.Tensor, device: torch.device) -> dict:
    logits = torch.cat([head(features[i : i + 4096].to(device).float()).cpu() for i in range(0, len(features), 4096)])
    out = {"top1": topk_accuracy(logits, labels, 1)}
    if logits.shape[1] >= 5:
        out["top5"] = topk_accuracy(logits, labels, 5)
    return out


def probe_cached(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, cfg: LinprobeConfig, device: torch.device,
                 log_row: Optional[Callable[[int, dict], None]] = None, desc: str = "linprobe",
                 store: Optional[ResumeStore] = None, curve_rows: Optional[list] = None,
                 ) -> tuple[dict, nn.Sequential]:  # fmt: skip
    """Linear probe + k-NN on features computed once (``mode: cached``)."""
    head = train_probe(train_f, train_y, num_classes, cfg, device, None, log_row, desc, store, curve_rows)
    metrics = evaluate_head(head, val_f, val_y, device)
    metrics["knn_top1"] = knn_accuracy(train_f.cpu(), train_y, val_f.cpu(), val_y, k=cfg.knn_k)
    return metrics, head


def probe_features(
    encode: Callable[[torch.Tensor], torch.Tensor], train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor], num_classes: int, cfg: LinprobeConfig, device: torch.device,
    log_row: Optional[Callable[[int, dict], None]] = None, desc: str = "linprobe",
    store: Optional[ResumeStore] = None, curve_rows: Optional[list] = None,
) -> tuple[dict, nn.Sequential]:  # fmt: skip
    """Linear probe + k-NN of ``encode`` on in-memory (images, labels) splits; returns metrics and the head."""
    val_f = encode_all(encode, val[0], cfg.eval_batch_size, f"{desc}: encode val")
    if cfg.mode == "cached":
        train_f = encode_all(encode, train[0], cfg.eval_batch_size, f"{desc}: encode train")
        return probe_cached(train_f, train[1], val_f, val[1], num_classes, cfg, device, log_row, desc, store, curve_rows)
    head = train_probe(train[0], train[1], num_classes, cfg, device, encode, log_row, desc, store, curve_rows)
    train_f = encode_all(encode, train[0], cfg.eval_batch_size, f"{desc}: encode train (k-NN)")
    metrics = evaluate_head(head, val_f, val[1], device)
    metrics["knn_top1"] = knn_accuracy(train_f.cpu(), train[1], val_f.cpu(), val[1], k=cfg.knn_k)
    return metrics, head
