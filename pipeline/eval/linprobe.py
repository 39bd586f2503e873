"""Linear probing, MAE's protocol: frozen encoder, CLS token after the final norm, BatchNorm1d
(affine=False) + Linear head trained with LARS, warm-up + per-iteration cosine lr.

Two modes give the same head when augmentation is off (tested): ``cached`` encodes every image
once and trains on the stored features (the default on CPU: the encoder runs once instead of once
per epoch); ``online`` encodes each batch as it comes, which augmentation needs.

``base_lr`` may be a grid: one head per candidate is trained on the same batches, the one with the best
top-1 on the ``holdout`` split (carved out of the training source by ``prepare``) is kept, and only that
head is evaluated on ``val``, the split whose numbers are reported.
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

__all__ = ["probe_head", "train_probe", "evaluate_head", "topk_accuracy", "probe_features", "probe_cached", "Encoder",
           "select_and_evaluate", "chosen_curve", "lr_key", "PROBE_SPLITS"]

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


def lr_key(base_lr: float) -> str:
    """A candidate's name in metrics and curve columns: its exact repr (``10.0``, ``0.1``)."""
    return repr(float(base_lr))


def train_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, cfg: LinprobeConfig, device: torch.device,
    encode: Encoder = None, log_row: Optional[Callable[[int, dict], None]] = None, desc: str = "linprobe",
    store: Optional[ResumeStore] = None, curve_rows: Optional[list] = None,
) -> dict[float, nn.Sequential]:  # fmt: skip
    """Train one probe head per candidate of ``cfg.base_lr`` on ``train_x``: features ``[N, D]`` (``encode=None``)
    or images ``uint8 [N, 3, S, S]`` encoded batch by batch by ``encode`` (optionally augmented).

    The heads share everything but the lr: the same initialisation (``cfg.seed``), the same batches in
    the same seeded order (each batch is encoded once for all of them); each has its own LARS optimiser,
    so a head trains exactly as it would alone. Returns ``{base_lr: head}``. Each curve row holds every
    head's ``loss_lr<base_lr>``, ``train_top1_lr<base_lr>`` and ``lr_lr<base_lr>`` (see :func:`chosen_curve`).
    ``store``: the heads, optimisers, generators and curves are saved at epoch ends and a killed run
    continues from there to the same heads."""
    lrs = cfg.base_lrs()
    n = len(train_x)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs  # full batches only, as MAE (drop_last)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        dim = (encode(train_x[:2]) if encode is not None else train_x[:2]).shape[1]
    heads, opts = [], []
    for _ in lrs:
        torch.manual_seed(cfg.seed)  # the same initial head for every candidate
        heads.append(probe_head(dim, num_classes).to(device))
        opts.append(LARS(heads[-1].parameters(), lr=0.0, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                         trust_coefficient=cfg.trust_coefficient))  # fmt: skip
    total = steps_per_epoch * cfg.epochs
    start_epoch = 0
    state = store.load() if store is not None else None
    if state is not None:
        for head, opt, h, o in zip(heads, opts, state["heads"], state["optimizers"], strict=True):
            head.load_state_dict(h)
            opt.load_state_dict(o)
        gen.set_state(state["generator"])
        aug_gen.set_state(state["aug_generator"])
        start_epoch = int(state["epoch"])
        if curve_rows is not None:
            curve_rows[:] = state["curves"]
        log.info("%s: resuming at epoch %d of %d", desc, start_epoch + 1, cfg.epochs)
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc=desc, unit="step", mininterval=1.0)
    for epoch in range(start_epoch, cfg.epochs):
        for head in heads:
            head.train()
        order = torch.randperm(n, generator=gen)
        loss_sum, correct, last_lr = [torch.zeros(()) for _ in lrs], [0 for _ in lrs], [0.0 for _ in lrs]
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            idx = order[i * bs : (i + 1) * bs]
            x = train_x[idx]
            if encode is not None:
                if cfg.augment:
                    x = (random_resized_crop(x.float(), x.shape[-1], tuple(cfg.crop_scale), aug_gen) + 0.5).clamp(0, 255)
                    x = x.to(torch.uint8)
                with torch.no_grad():
                    x = encode(x)
            x, y = x.to(device).float(), train_y[idx].to(device)
            for h, (base_lr, head, opt) in enumerate(zip(lrs, heads, opts)):
                lr = warmup_cosine(step / steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.peak_lr(base_lr), cfg.min_lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                last_lr[h] = lr
                logits = head(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum[h] += loss.detach().cpu()
                correct[h] += int((logits.argmax(1) == y).sum())
            bar.update()
        stats: dict = {"epoch": epoch + 1}
        step = (epoch + 1) * steps_per_epoch
        for h, base_lr in enumerate(lrs):
            key = lr_key(base_lr)
            stats[f"loss_lr{key}"] = float(loss_sum[h]) / steps_per_epoch
            stats[f"train_top1_lr{key}"] = correct[h] / (steps_per_epoch * bs)
            stats[f"lr_lr{key}"] = last_lr[h]  # the epoch's last step
        bar.set_postfix(loss=" ".join(f"{float(v) / steps_per_epoch:.3f}" for v in loss_sum))
        if log_row is not None:
            log_row(step, stats)
        if store is not None:
            store.save({"heads": [hd.state_dict() for hd in heads], "optimizers": [o.state_dict() for o in opts],
                        "generator": gen.get_state(), "aug_generator": aug_gen.get_state(), "epoch": epoch + 1,
                        "curves": list(curve_rows or [])})  # fmt: skip
    bar.close()
    return {base_lr: head.eval() for base_lr, head in zip(lrs, heads)}


def chosen_curve(rows: list[dict], base_lr: float) -> list[dict]:
    """The curve rows with ``loss``, ``train_top1`` and ``lr`` of the head trained at ``base_lr`` (the
    chosen one) added next to every head's own columns."""
    key = lr_key(base_lr)
    return [{**row, "loss": row[f"loss_lr{key}"], "train_top1": row[f"train_top1_lr{key}"], "lr": row[f"lr_lr{key}"]}
            for row in rows]  # fmt: skip


@torch.no_grad()
def evaluate_head(head: nn.Sequential, features: torch.Tensor, labels: torch.Tensor, device: torch.device) -> dict:
    logits = torch.cat([head(features[i : i + 4096].to(device).float()).cpu() for i in range(0, len(features), 4096)])
    out = {"top1": topk_accuracy(logits, labels, 1)}
    if logits.shape[1] >= 5:
        out["top5"] = topk_accuracy(logits, labels, 5)
    return out


def select_and_evaluate(heads: dict[float, nn.Sequential], feats: dict[str, torch.Tensor],
                        labels: dict[str, torch.Tensor], cfg: LinprobeConfig, device: torch.device,
                        ) -> tuple[dict, nn.Sequential]:  # fmt: skip
    """Choose the head with the best ``holdout`` top-1 (ties: the smaller lr) and report it on ``val``.

    The choice never sees ``val``: ``top1``/``top5``/``knn_top1`` are val numbers of the chosen head (k-NN:
    train features as memory), ``holdout_top1``/``holdout_by_lr``/``holdout_knn_top1`` are hold-out numbers."""
    by_lr = {lr: evaluate_head(head, feats["holdout"], labels["holdout"], device)["top1"] for lr, head in heads.items()}
    best = max(sorted(by_lr), key=lambda lr: (by_lr[lr], -lr))
    metrics = evaluate_head(heads[best], feats["val"], labels["val"], device)
    train_f = feats["train"].cpu()
    metrics["knn_top1"] = knn_accuracy(train_f, labels["train"], feats["val"].cpu(), labels["val"], k=cfg.knn_k)
    metrics["holdout_knn_top1"] = knn_accuracy(train_f, labels["train"], feats["holdout"].cpu(), labels["holdout"],
                                               k=cfg.knn_k)  # fmt: skip
    metrics.update(base_lr=best, holdout_top1=by_lr[best], holdout_by_lr={lr_key(lr): by_lr[lr] for lr in sorted(by_lr)})
    log.info("linprobe: base_lr %s chosen on holdout top-1 %s", best, metrics["holdout_by_lr"])
    return metrics, heads[best]


PROBE_SPLITS = ("train", "holdout", "val")  # heads train on train, are chosen on holdout, reported on val


def _check_splits(splits: dict) -> None:
    missing = [s for s in PROBE_SPLITS if s not in splits]
    if missing:
        raise ValueError(f"linear probe needs the splits {list(PROBE_SPLITS)}; missing {missing}")


def probe_cached(feats: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], num_classes: int, cfg: LinprobeConfig,
                 device: torch.device, log_row: Optional[Callable[[int, dict], None]] = None, desc: str = "linprobe",
                 store: Optional[ResumeStore] = None, curve_rows: Optional[list] = None,
                 ) -> tuple[dict, nn.Sequential]:  # fmt: skip
    """Linear probe + k-NN on features computed once (``mode: cached``): ``feats``/``labels`` per split of
    :data:`PROBE_SPLITS`. Returns the metrics and the chosen head."""
    _check_splits(feats)
    heads = train_probe(feats["train"], labels["train"], num_classes, cfg, device, None, log_row, desc, store, curve_rows)
    return select_and_evaluate(heads, feats, labels, cfg, device)


def probe_features(
    encode: Callable[[torch.Tensor], torch.Tensor], splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    num_classes: int, cfg: LinprobeConfig, device: torch.device,
    log_row: Optional[Callable[[int, dict], None]] = None, desc: str = "linprobe",
    store: Optional[ResumeStore] = None, curve_rows: Optional[list] = None,
) -> tuple[dict, nn.Sequential]:  # fmt: skip
    """Linear probe + k-NN of ``encode`` on in-memory ``{split: (images, labels)}`` of :data:`PROBE_SPLITS`;
    returns the metrics and the chosen head."""
    _check_splits(splits)
    labels = {s: y for s, (_, y) in splits.items()}
    feats = {s: encode_all(encode, x, cfg.eval_batch_size, f"{desc}: encode {s}") for s, (x, _) in splits.items()
             if cfg.mode == "cached" or s != "train"}  # fmt: skip
    if cfg.mode == "cached":
        return probe_cached(feats, labels, num_classes, cfg, device, log_row, desc, store, curve_rows)
    train_x = splits["train"][0]
    heads = train_probe(train_x, labels["train"], num_classes, cfg, device, encode, log_row, desc, store, curve_rows)
    feats["train"] = encode_all(encode, train_x, cfg.eval_batch_size, f"{desc}: encode train (k-NN)")
    return select_and_evaluate(heads, feats, labels, cfg, device)
