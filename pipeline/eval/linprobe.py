"""Linear probing, MAE's protocol: frozen encoder, CLS token after the final norm, BatchNorm1d
(affine=False) + Linear head trained with LARS, warm-up + per-iteration cosine lr.

Two modes: ``cached`` encodes every image once and trains on the stored features (the default on
CPU: the encoder runs once instead of once per epoch); ``online`` streams the training images from
the prepared shards every epoch (:func:`pipeline.data.labelled.train_loader`) and encodes each batch as it
comes, which augmentation needs (MAE's ImageNet protocol: RandomResizedCrop + flip). Without
augmentation both train on the same features and give heads that agree (tested).

Online under ``torchrun``: every rank loads and encodes its share of each global batch, the features
are gathered, and every rank steps the heads on the whole global batch: the gradient of the global
batch (what averaging the ranks' gradients gives) and BatchNorm statistics of the global batch, so
the heads are those of one process reading the same batch (tested bit for bit).

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

from pipeline import distributed as D
from pipeline.config.linprobe import LinprobeConfig
from pipeline.data.labelled import eval_batches, eval_transform, train_loader, train_transform
from pipeline.eval.encode import FrozenEncoder
from pipeline.eval.knn import knn_accuracy
from pipeline.eval.lars import LARS
from pipeline.resume import ResumeStore
from pipeline.schedule import warmup_cosine

__all__ = ["probe_head", "train_probe", "evaluate_head", "topk_accuracy", "probe_features", "probe_cached",
           "select_and_evaluate", "chosen_curve", "lr_key", "PROBE_SPLITS", "online_batch", "train_online",
           "probe_online"]  # fmt: skip

log = logging.getLogger(__name__)

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


def _new_heads(lrs: list[float], dim: int, num_classes: int, cfg: LinprobeConfig, device: torch.device,
               ) -> tuple[list[nn.Sequential], list[LARS]]:  # fmt: skip
    heads, opts = [], []
    for _ in lrs:
        torch.manual_seed(cfg.seed)  # the same initial head for every candidate
        heads.append(probe_head(dim, num_classes).to(device))
        opts.append(LARS(heads[-1].parameters(), lr=0.0, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                         trust_coefficient=cfg.trust_coefficient))  # fmt: skip
    return heads, opts


class _Epoch:
    """One epoch's running loss, correct count and last lr of every head."""

    def __init__(self, lrs: list[float]) -> None:
        self.loss_sum, self.correct, self.last_lr = [torch.zeros(()) for _ in lrs], [0 for _ in lrs], [0.0 for _ in lrs]

    def stats(self, lrs: list[float], epoch: int, steps: int, bs: int) -> dict:
        stats: dict = {"epoch": epoch + 1}
        for h, base_lr in enumerate(lrs):
            key = lr_key(base_lr)
            stats[f"loss_lr{key}"] = float(self.loss_sum[h]) / steps
            stats[f"train_top1_lr{key}"] = self.correct[h] / (steps * bs)
            stats[f"lr_lr{key}"] = self.last_lr[h]  # the epoch's last step
        return stats


def _step_heads(lrs: list[float], heads: list[nn.Sequential], opts: list[LARS], x: torch.Tensor, y: torch.Tensor,
                progress: float, cfg: LinprobeConfig, acc: _Epoch) -> None:  # fmt: skip
    """One LARS step of every head on the batch ``(x, y)`` at ``progress`` (fractional epoch) of the schedule."""
    for h, (base_lr, head, opt) in enumerate(zip(lrs, heads, opts)):
        lr = warmup_cosine(progress, cfg.epochs, cfg.warmup_epochs, cfg.peak_lr(base_lr), cfg.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        acc.last_lr[h] = lr
        logits = head(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc.loss_sum[h] += loss.detach().cpu()
        acc.correct[h] += int((logits.argmax(1) == y).sum())


def train_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, cfg: LinprobeConfig, device: torch.device,
    log_row: Optional[Callable[[int, dict], None]] = None, desc: str = "linprobe",
    store: Optional[ResumeStore] = None, curve_rows: Optional[list] = None,
) -> dict[float, nn.Sequential]:  # fmt: skip
    """Train one probe head per candidate of ``cfg.base_lr`` on stored features ``train_x`` ``[N, D]``.

    The heads share everything but the lr: the same initialisation (``cfg.seed``), the same batches in
    the same seeded order; each has its own LARS optimiser, so a head trains exactly as it would alone.
    Returns ``{base_lr: head}``. Each curve row holds every head's ``loss_lr<base_lr>``,
    ``train_top1_lr<base_lr>`` and ``lr_lr<base_lr>`` (see :func:`chosen_curve`). ``store``: the heads,
    optimisers, generator and curves are saved at epoch ends and a killed run continues from there to
    the same heads."""
    lrs = cfg.base_lrs()
    n = len(train_x)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs  # full batches only, as MAE (drop_last)
    gen = torch.Generator().manual_seed(cfg.seed)
    heads, opts = _new_heads(lrs, train_x.shape[1], num_classes, cfg, device)
    total = steps_per_epoch * cfg.epochs
    start_epoch = 0
    state = store.load() if store is not None else None
    if state is not None:
        for head, opt, h, o in zip(heads, opts, state["heads"], state["optimizers"], strict=True):
            head.load_state_dict(h)
            opt.load_state_dict(o)
        gen.set_state(state["generator"])
        start_epoch = int(state["epoch"])
        if curve_rows is not None:
            curve_rows[:] = state["curves"]
        log.info("%s: resuming at epoch %d of %d", desc, start_epoch + 1, cfg.epochs)
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc=desc, unit="step", mininterval=1.0)
    trained = 0
    for epoch in range(start_epoch, cfg.epochs):
        trained += 1
        for head in heads:
            head.train()
        order = torch.randperm(n, generator=gen)
        acc = _Epoch(lrs)
        for i in range(steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            x, y = train_x[idx].to(device).float(), train_y[idx].to(device)
            _step_heads(lrs, heads, opts, x, y, (epoch * steps_per_epoch + i) / steps_per_epoch, cfg, acc)
            bar.update()
        stats = acc.stats(lrs, epoch, steps_per_epoch, bs)
        bar.set_postfix(loss=" ".join(f"{float(v) / steps_per_epoch:.3f}" for v in acc.loss_sum))
        if log_row is not None:
            log_row((epoch + 1) * steps_per_epoch, stats)
        if store is not None:
            store.save({"heads": [hd.state_dict() for hd in heads], "optimizers": [o.state_dict() for o in opts],
                        "generator": gen.get_state(), "epoch": epoch + 1,
                        "curves": list(curve_rows or [])})  # fmt: skip
    bar.close()
    log.info("%s: %d of %d epochs trained in this run", desc, trained, cfg.epochs)
    return {base_lr: head.eval() for base_lr, head in zip(lrs, heads)}


def online_batch(cfg: LinprobeConfig, n_train: int, world: int) -> tuple[int, int, int]:
    """Online mode's ``(global batch, images per rank per step, images per loader batch)``: the global
    batch is ``batch_size`` (at most the training images), split evenly over the ranks; each rank reads
    its share in loader batches of at most ``eval_batch_size`` images (the largest such divisor), encoded
    one at a time. ValueError, naming the values, when the batch does not split over the ranks."""
    bs = min(cfg.batch_size, n_train)
    if bs == 0:
        raise ValueError("the train split has no images")
    if bs % world:
        raise ValueError(f"linprobe batch_size={bs} (the global batch) is not divisible by the {world} ranks: "
                         f"make it a multiple of {world}")  # fmt: skip
    per_rank = bs // world
    micro = max(d for d in range(1, min(per_rank, cfg.eval_batch_size) + 1) if per_rank % d == 0)
    return bs, per_rank, micro


def _gather(t: torch.Tensor) -> torch.Tensor:
    """The ranks' ``t`` (equal shapes) concatenated in rank order, on every rank: a sum over ranks of a
    zero-padded tensor, exact (pipeline.distributed has no all-gather; x + 0 is x)."""
    world = D.world_size()
    if world == 1:
        return t
    full = torch.zeros((world, *t.shape), dtype=t.dtype, device=t.device)
    full[D.rank()] = t
    return D.sum_over_ranks(full).flatten(0, 1)


def train_online(
    encoders: dict[str, FrozenEncoder], shards: list[str], counts: list[int], img_size: int, num_classes: int,
    cfg: LinprobeConfig, device: torch.device, log_row: Optional[Callable[[int, dict], None]] = None,
    desc: str = "linprobe", store: Optional[ResumeStore] = None, curve_rows: Optional[list] = None,
) -> dict[str, dict[float, nn.Sequential]]:  # fmt: skip
    """``mode: online``: train one head per candidate of ``cfg.base_lr`` for every encoder on the training
    images streamed from ``shards`` (every epoch anew; ``augment``: timm's RandomResizedCrop + flip, else the
    evaluation crop), each batch read once and encoded by every encoder. Returns ``{encoder: {base_lr: head}}``.

    Per epoch ``train images // batch_size`` steps; each rank reads ``batch_size / world`` images per step,
    their features are gathered and every rank steps every head on the whole global batch (same heads on
    every rank). The loader's randomness is reseeded per (seed, epoch, stream), so with ``store`` (saved by
    rank 0 at epoch ends, loaded by every rank) a killed run continues to the same heads. Curve rows as
    :func:`train_probe` (an encoder with a name gets it as a column prefix)."""
    lrs = cfg.base_lrs()
    world, rank = D.world_size(), D.rank()
    n = sum(counts)
    bs, per_rank, micro = online_batch(cfg, n, world)
    steps_per_epoch = n // bs  # full batches only, as MAE (drop_last)
    if cfg.augment:  # MAE's probe augmentation: no colour jitter, no RandAugment
        transform = train_transform(img_size, cfg.crop_scale, hflip=0.5)
    else:
        transform = eval_transform(img_size, cfg.eval_crop_pct)
    heads, opts = {}, {}
    for name, enc in encoders.items():
        dim = enc.normalized(torch.zeros(1, 3, img_size, img_size)).shape[1]
        heads[name], opts[name] = _new_heads(lrs, dim, num_classes, cfg, device)
    start_epoch = 0
    state = store.load() if store is not None else None
    if state is not None:
        for name in encoders:
            for head, opt, h, o in zip(heads[name], opts[name], state["heads"][name], state["optimizers"][name],
                                       strict=True):  # fmt: skip
                head.load_state_dict(h)
                opt.load_state_dict(o)
        start_epoch = int(state["epoch"])
        if curve_rows is not None:
            curve_rows[:] = state["curves"]
    if world > 1 and int(D.sum_over_ranks(torch.tensor(start_epoch))) != start_epoch * world:
        raise RuntimeError(f"{desc}: the ranks found different resume states; the resume directory must be one "
                           "directory every rank reads")  # fmt: skip
    if start_epoch:
        log.info("%s: resuming at epoch %d of %d", desc, start_epoch + 1, cfg.epochs)
    bar = tqdm(total=steps_per_epoch * cfg.epochs, initial=start_epoch * steps_per_epoch, desc=desc, unit="step",
               mininterval=1.0, disable=not D.is_main())  # fmt: skip
    for epoch in range(start_epoch, cfg.epochs):
        for hs in heads.values():
            for head in hs:
                head.train()
        loader = train_loader(shards, counts, transform, cfg.seed, epoch, rank, world, cfg.shuffle_buffer, micro,
                              cfg.num_workers)  # fmt: skip
        batches = iter(loader)
        acc = {name: _Epoch(lrs) for name in encoders}
        for i in range(steps_per_epoch):
            feats: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
            ys = []
            for _ in range(per_rank // micro):
                images, labels = next(batches)
                for name, enc in encoders.items():
                    feats[name].append(enc.normalized(images).float())
                ys.append(labels)
            y = _gather(torch.cat(ys).to(device))
            for name in encoders:
                x = _gather(torch.cat(feats[name]).to(device))
                _step_heads(lrs, heads[name], opts[name], x, y, (epoch * steps_per_epoch + i) / steps_per_epoch, cfg,
                            acc[name])  # fmt: skip
            bar.update()
        del batches, loader  # its workers end with the epoch
        stats: dict = {"epoch": epoch + 1}
        for name in encoders:
            prefix = f"{name}_" if name else ""
            stats.update({k if k == "epoch" else prefix + k: v
                          for k, v in acc[name].stats(lrs, epoch, steps_per_epoch, bs).items()})  # fmt: skip
        if log_row is not None:
            log_row((epoch + 1) * steps_per_epoch, stats)
        if store is not None and D.is_main():
            store.save({"heads": {nm: [hd.state_dict() for hd in hs] for nm, hs in heads.items()},
                        "optimizers": {nm: [o.state_dict() for o in os_] for nm, os_ in opts.items()},
                        "epoch": epoch + 1, "curves": list(curve_rows or [])})  # fmt: skip
        D.barrier()
    bar.close()
    return {name: {base_lr: head.eval() for base_lr, head in zip(lrs, hs)} for name, hs in heads.items()}


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


def _choose(by_lr: dict[float, float]) -> float:
    """The candidate with the best hold-out top-1 (ties: the smaller lr)."""
    return max(sorted(by_lr), key=lambda lr: (by_lr[lr], -lr))


def select_and_evaluate(heads: dict[float, nn.Sequential], feats: dict[str, torch.Tensor],
                        labels: dict[str, torch.Tensor], cfg: LinprobeConfig, device: torch.device,
                        ) -> tuple[dict, nn.Sequential]:  # fmt: skip
    """Choose the head with the best ``holdout`` top-1 (ties: the smaller lr) and report it on ``val``.

    The choice never sees ``val``: ``top1``/``top5``/``knn_top1`` are val numbers of the chosen head (k-NN:
    train features as memory), ``holdout_top1``/``holdout_by_lr``/``holdout_knn_top1`` are hold-out numbers."""
    by_lr = {lr: evaluate_head(head, feats["holdout"], labels["holdout"], device)["top1"] for lr, head in heads.items()}
    best = _choose(by_lr)
    metrics = evaluate_head(heads[best], feats["val"], labels["val"], device)
    metrics.update(_knn(feats, labels, cfg))
    metrics.update(base_lr=best, holdout_top1=by_lr[best], holdout_by_lr={lr_key(lr): by_lr[lr] for lr in sorted(by_lr)})
    log.info("linprobe: base_lr %s chosen on holdout top-1 %s", best, metrics["holdout_by_lr"])
    return metrics, heads[best]


def _knn(feats: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], cfg: LinprobeConfig) -> dict:
    """k-NN top-1 on val and on holdout, the train features as memory."""
    train_f = feats["train"].cpu()
    return {"knn_top1": knn_accuracy(train_f, labels["train"], feats["val"].cpu(), labels["val"], k=cfg.knn_k),
            "holdout_knn_top1": knn_accuracy(train_f, labels["train"], feats["holdout"].cpu(), labels["holdout"],
                                             k=cfg.knn_k)}  # fmt: skip


@torch.no_grad()
def _stream_counts(heads: dict[str, list[nn.Sequential]], encoders: dict[str, FrozenEncoder], shards: list[str],
                   counts: list[int], transform: Callable, batch_size: int, device: torch.device, desc: str,
                   ) -> dict[str, torch.Tensor]:  # fmt: skip
    """``{encoder: [heads, 3]}``: top-1 hits, top-5 hits and images of every head on a split streamed once
    (every rank its share of the shards, counts summed over the ranks)."""
    hits = {name: torch.zeros(len(hs), 3, dtype=torch.float64) for name, hs in heads.items()}
    bar = tqdm(total=sum(counts), desc=desc, unit="img", mininterval=1.0, disable=not D.is_main())
    for images, labels in eval_batches(shards, counts, transform, batch_size, D.rank(), D.world_size()):
        for name, hs in heads.items():
            x = encoders[name].normalized(images).float().to(device)
            for h, head in enumerate(hs):
                logits = head(x).cpu()
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hit = top == labels[:, None]
                hits[name][h] += torch.tensor([int(hit[:, 0].sum()), int(hit.any(1).sum()), len(labels)],
                                              dtype=torch.float64)  # fmt: skip
        bar.update(len(labels))
    bar.close()
    names = list(heads)
    summed = D.sum_over_ranks(torch.cat([hits[n] for n in names])) if names else torch.zeros(0, 3)
    return dict(zip(names, summed.split([len(heads[n]) for n in names])))


def probe_online(
    encoders: dict[str, FrozenEncoder], splits: dict[str, tuple[list[str], list[int]]], img_size: int,
    feats: dict[str, dict[str, torch.Tensor]], labels: dict[str, torch.Tensor], num_classes: int,
    cfg: LinprobeConfig, device: torch.device, log_row: Optional[Callable[[int, dict], None]] = None,
    desc: str = "linprobe", store: Optional[ResumeStore] = None, curve_rows: Optional[list] = None,
) -> dict[str, tuple[dict, nn.Sequential]]:  # fmt: skip
    """``mode: online`` probe + k-NN of every encoder: heads trained by :func:`train_online` on the streamed
    ``splits["train"]`` (``(shard paths, sample counts)`` per split of :data:`PROBE_SPLITS`), every head scored on
    the streamed ``holdout`` images, the best (ties: the smaller lr) on ``val`` (both with the evaluation crop
    of ``eval_crop_pct``); the k-NN on ``feats`` (``{encoder: {split: features}}``, un-augmented evaluation
    crops) and ``labels``. Every rank takes part; the metrics are complete on rank 0 (the k-NN runs there).
    Returns ``{encoder: (metrics, chosen head)}`` with the keys of :func:`select_and_evaluate`."""
    _check_splits(splits)
    lrs = cfg.base_lrs()
    trained = train_online(encoders, *splits["train"], img_size, num_classes, cfg, device, log_row, desc, store,
                           curve_rows)  # fmt: skip
    transform = eval_transform(img_size, cfg.eval_crop_pct)
    held = _stream_counts({n: [hs[lr] for lr in lrs] for n, hs in trained.items()}, encoders, *splits["holdout"],
                          transform, cfg.eval_batch_size, device, f"{desc}: holdout")  # fmt: skip
    by_lr = {n: {lr: float(c[h, 0] / c[h, 2]) for h, lr in enumerate(lrs)} for n, c in held.items()}
    best = {n: _choose(by_lr[n]) for n in trained}
    val = _stream_counts({n: [trained[n][best[n]]] for n in trained}, encoders, *splits["val"], transform,
                         cfg.eval_batch_size, device, f"{desc}: val")  # fmt: skip
    results = {}
    for name in trained:
        c1, c5, n = val[name][0].tolist()
        metrics = {"top1": c1 / n}
        if num_classes >= 5:
            metrics["top5"] = c5 / n
        if D.is_main():
            metrics.update(_knn(feats[name], labels, cfg))
        lr = best[name]
        metrics.update(base_lr=lr, holdout_top1=by_lr[name][lr],
                       holdout_by_lr={lr_key(x): by_lr[name][x] for x in sorted(by_lr[name])})  # fmt: skip
        log.info("%s %s: base_lr %s chosen on holdout top-1 %s", desc, name, lr, metrics["holdout_by_lr"])
        results[name] = (metrics, trained[name][lr])
    return results


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
    heads = train_probe(feats["train"], labels["train"], num_classes, cfg, device, log_row, desc, store, curve_rows)
    return select_and_evaluate(heads, feats, labels, cfg, device)


def probe_features(
    encode: Callable[[torch.Tensor], torch.Tensor], splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    num_classes: int, cfg: LinprobeConfig, device: torch.device,
    log_row: Optional[Callable[[int, dict], None]] = None, desc: str = "linprobe",
    store: Optional[ResumeStore] = None, curve_rows: Optional[list] = None,
) -> tuple[dict, nn.Sequential]:  # fmt: skip
    """Linear probe + k-NN of ``encode`` on in-memory ``{split: (images, labels)}`` of :data:`PROBE_SPLITS`,
    the cached protocol (every image encoded once); returns the metrics and the chosen head. Online mode
    streams from the prepared shards: :func:`probe_online`."""
    if cfg.mode != "cached":
        raise ValueError(f"probe_features trains on features computed once (mode: cached), not mode: {cfg.mode}")
    _check_splits(splits)
    labels = {s: y for s, (_, y) in splits.items()}
    feats = {s: encode_all(encode, x, cfg.eval_batch_size, f"{desc}: encode {s}") for s, (x, _) in splits.items()}
    return probe_cached(feats, labels, num_classes, cfg, device, log_row, desc, store, curve_rows)
