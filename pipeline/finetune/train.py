"""End-to-end fine-tuning, MAE's protocol: a pretrained (or freshly initialised) timm ViT with a new
head on the average-pooled patch tokens (LayerNorm ``fc_norm`` then Linear), trained on the labelled
training images; model choices are read on the ``holdout`` split, the reported numbers on ``val``.

The pieces are timm's: the classifier (``global_pool='avg'``, ``drop_path_rate``), layer-wise lr decay
parameter groups (``param_groups_layer_decay``), ``Mixup`` (mixup/cutmix with label smoothing),
``SoftTargetCrossEntropy``, and ``create_transform`` (RandAugment, random erasing). The loop adds MAE's
per-iteration warm-up + half-cycle cosine (each group's lr scaled by its ``lr_scale``), gradient
accumulation, bf16 autocast on CUDA, DDP under ``torchrun``, and resume checkpoints at epoch ends: the
randomness of every epoch is reseeded from ``(seed, run seed, epoch, rank)``, so a resumed run ends
with the weights of an unbroken one (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from pipeline import distributed as D
from pipeline.config.base import resolved_config
from pipeline.config.finetune import FinetuneConfig
from pipeline.data.shards import read_index, shard_entries
from pipeline.errors import PipelineError
from pipeline.data.labelled import eval_batches, eval_transform, mix_seed, seed_everything, train_loader, train_transform
from pipeline.io import atomic_output_dir, ensure_free_space, json_bytes
from pipeline.models.checkpoint import CheckpointError, backbone_state_dict, load_checkpoint_file
from pipeline.resume import ResumeStore
from pipeline.schedule import warmup_cosine

__all__ = ["FinetuneError", "build_classifier", "load_pretrained_encoder", "finetune", "evaluate", "SHAPE_KEYS"]

log = logging.getLogger(__name__)
SHAPE_KEYS = ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads")
EVAL_BATCH = 256


class FinetuneError(PipelineError):
    """Fine-tuning cannot start or go on; the message says what to change."""


def build_classifier(shape: dict, num_classes: int, drop_path: float) -> nn.Module:
    """A timm ViT of ``shape`` with MAE's fine-tuning head: mean of the patch tokens -> ``fc_norm`` -> Linear
    (weights ~ trunc-normal std 2e-5, MAE's init), stochastic depth up to ``drop_path``."""
    import timm

    model = timm.create_model(shape["arch"], pretrained=False, num_classes=num_classes, global_pool="avg",
                              drop_path_rate=drop_path, img_size=shape["img_size"], patch_size=shape["patch_size"],
                              embed_dim=shape["embed_dim"], depth=shape["depth"], num_heads=shape["num_heads"])  # fmt: skip
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


def load_pretrained_encoder(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a pretrain run's ``encoder.pth`` into ``model``; the head and ``fc_norm`` stay new, the encoder's
    final ``norm`` is dropped (MAE's fine-tuning replaces it by ``fc_norm`` after the pooling)."""
    sd = {k: v for k, v in backbone_state_dict(load_checkpoint_file(path), path).items() if not k.startswith("norm.")}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise CheckpointError(f"{path} does not fit the fine-tuning model: {str(exc).splitlines()[-1].strip()}") from None
    new = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    if set(missing) != new or unexpected:
        raise CheckpointError(f"{path} does not fit the fine-tuning model: missing {sorted(set(missing) - new)[:8]}, "
                              f"unexpected {sorted(unexpected)[:8]}; was it written by `semmae pretrain`?")  # fmt: skip
    return model


@torch.no_grad()
def evaluate(model: nn.Module, prepared: Path, split: str, img_size: int, crop_pct: float, device: torch.device,
             autocast: bool, desc: str = "") -> dict:  # fmt: skip
    """Top-1 (and top-5 with >= 5 classes) of ``model`` on ``split``; the ranks share the shards."""
    entries = shard_entries(prepared, split)
    transform = eval_transform(img_size, crop_pct)
    counts = torch.zeros(3, dtype=torch.float64)
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(e.num_samples for e in entries), desc=desc or f"evaluate {split}", unit="img",
               disable=not D.is_main(), mininterval=1.0, leave=False)  # fmt: skip
    for x, y in eval_batches([e.path for e in entries], [e.num_samples for e in entries], transform, EVAL_BATCH,
                             D.rank(), D.world_size()):  # fmt: skip
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x.to(device)).float().cpu()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        counts += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), len(y)], dtype=torch.float64)
        bar.update(len(y))
    bar.close()
    model.train(was_training)
    c1, c5, n = D.sum_over_ranks(counts).tolist()
    out = {"top1": c1 / n}
    if model.num_classes >= 5:
        out["top5"] = c5 / n
    return out


@dataclass
class _Run:
    cfg: FinetuneConfig
    prepared: Path
    img_size: int
    run_seed: int
    device: torch.device
    world: int
    micro: int
    steps_per_epoch: int
    autocast: bool
    shards: list[str]
    counts: list[int]
    model: nn.Module
    opt: torch.optim.Optimizer
    mixup: Optional[Callable]
    criterion: nn.Module
    store: Optional[ResumeStore]


def _set_up(cfg: FinetuneConfig, shape: dict, prepared: Path, encoder: Optional[Path], run_seed: int,
            resume_dir: Optional[Path], fingerprint: str) -> _Run:  # fmt: skip
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay

    index = read_index(prepared)
    num_classes = len(index["classes"])
    for split in ("train", "val"):
        if split not in index["splits"]:
            raise FinetuneError(f"{prepared}/index.json has no '{split}' split: rerun `dvc repro prepare`")
    entries = shard_entries(prepared, "train")
    n_train = sum(e.num_samples for e in entries)
    D.init_distributed()
    device, world = D.device_for_rank(), D.world_size()
    if cfg.batch_size % (world * cfg.accum_steps):
        raise FinetuneError(f"finetune batch_size={cfg.batch_size} is not divisible by {world} rank(s) x "
                            f"accum_steps={cfg.accum_steps}")  # fmt: skip
    micro = cfg.batch_size // (world * cfg.accum_steps)
    if cfg.mixing and micro % 2:
        raise FinetuneError(f"finetune: mixup/cutmix pair the images of a micro-batch, which has {micro} (batch_size "
                            f"{cfg.batch_size} / ({world} rank(s) x accum_steps {cfg.accum_steps})): make it even")  # fmt: skip
    steps_per_epoch = cfg.steps_per_epoch or n_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise FinetuneError(f"finetune batch_size={cfg.batch_size} exceeds the {n_train} training images: lower it")
    autocast = device.type == "cuda" if cfg.precision == "auto" else cfg.precision == "bf16"

    torch.manual_seed(mix_seed(cfg.seed, run_seed, 0))  # the same head init for every variant of a seed
    model = build_classifier(shape, num_classes, cfg.drop_path)
    if encoder is not None:
        load_pretrained_encoder(model, encoder)
    model.to(device)
    state_bytes = 3 * 4 * sum(p.numel() for p in model.parameters())
    if resume_dir is not None:
        ensure_free_space(resume_dir, 2 * state_bytes, "finetune's resume checkpoints (last.pth + prev.pth)")
    groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=cfg.layer_decay)  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=cfg.peak_lr(), betas=tuple(cfg.betas), fused=device.type == "cuda")
    mixup = None
    if cfg.mixing:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.label_smoothing,
                      num_classes=num_classes)  # fmt: skip
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif cfg.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    store = ResumeStore(resume_dir, fingerprint) if resume_dir is not None else None
    return _Run(cfg, prepared, shape["img_size"], run_seed, device, world, micro, steps_per_epoch, autocast,
                [e.path for e in entries], [e.num_samples for e in entries], model, opt, mixup, criterion, store)  # fmt: skip


def finetune(cfg: FinetuneConfig, shape: dict, prepared: str | Path, out_dir: str | Path, run_seed: int,
             encoder: Optional[str | Path] = None, resume_dir: Optional[str | Path] = None, fingerprint: str = "",
             log_row: Optional[Callable[[int, dict], None]] = None, curve_rows: Optional[list] = None) -> dict:  # fmt: skip
    """Fine-tune (``encoder``: a pretrain run's ``encoder.pth``; ``None``: from scratch) and write ``model.pth``,
    ``config.json`` and ``meta.json`` into ``out_dir`` (rank 0, atomically). Returns the metrics (rank 0)."""
    prepared = Path(prepared)
    run = _set_up(cfg, shape, prepared, Path(encoder) if encoder is not None else None, run_seed,
                  Path(resume_dir) if resume_dir is not None else None, fingerprint)  # fmt: skip
    if D.is_main():  # model.pth holds the weights alone (a third of a resume state's 3x)
        ensure_free_space(out_dir, 4 * sum(p.numel() for p in run.model.parameters()) + 65536, "finetune's outputs (model.pth)")
    start_epoch = 0
    state = run.store.load() if run.store is not None else None
    if state is not None:
        run.model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        if curve_rows is not None:
            curve_rows[:] = state.get("curves", [])
    net = nn.parallel.DistributedDataParallel(run.model) if run.world > 1 else run.model
    total = run.steps_per_epoch * cfg.epochs
    bar = tqdm(total=total, initial=start_epoch * run.steps_per_epoch, desc=f"finetune seed {run_seed}", unit="step",
               disable=not D.is_main(), mininterval=1.0)  # fmt: skip
    has_holdout = "holdout" in read_index(prepared)["splits"]
    holdout: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        rows = _train_epoch(run, net, epoch, bar)
        last = epoch + 1 == cfg.epochs
        if has_holdout and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            holdout = evaluate(run.model, prepared, "holdout", run.img_size, cfg.eval_crop_pct, run.device,
                               run.autocast, "finetune: holdout")  # fmt: skip
            rows[-1]["holdout_top1"] = holdout["top1"]
        if log_row is not None and D.is_main():
            for row in rows:
                log_row(row.pop("step"), row)
        if D.is_main() and run.store is not None and ((epoch + 1) % cfg.checkpoint_every == 0 or last):
            run.store.save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "epoch": epoch + 1,
                            "curves": list(curve_rows or [])})  # fmt: skip
        D.barrier()
    bar.close()

    if has_holdout and not holdout:  # resumed from the final epoch's state: not evaluated in this process
        holdout = evaluate(run.model, prepared, "holdout", run.img_size, cfg.eval_crop_pct, run.device, run.autocast)
    result = {f"holdout_{k}": v for k, v in holdout.items()}
    result |= evaluate(run.model, prepared, "val", run.img_size, cfg.eval_crop_pct, run.device, run.autocast)
    result |= {"epochs": cfg.epochs, "steps": total, "base_lr": cfg.base_lr, "resumed_from_epoch": start_epoch,
               "pretrained": encoder is not None, "seed": run_seed}  # fmt: skip
    if D.is_main():
        with atomic_output_dir(out_dir) as tmp:
            buf = io.BytesIO()
            torch.save({"model": {k: v.detach().cpu() for k, v in sorted(run.model.state_dict().items())}}, buf)
            (tmp / "model.pth").write_bytes(buf.getvalue())
            (tmp / "config.json").write_bytes(resolved_config(cfg, "finetune"))
            (tmp / "meta.json").write_bytes(json_bytes({**shape, "num_classes": run.model.num_classes,
                                                        "pretrained": encoder is not None, "seed": run_seed}))  # fmt: skip
        if run.store is not None:
            run.store.clear()
    D.barrier()
    D.cleanup()
    return result if D.is_main() else {}


def _train_epoch(run: _Run, net: nn.Module, epoch: int, bar: tqdm) -> list[dict]:
    """One epoch; returns its curve rows (one per step: step, loss averaged over the ranks, lr, epoch)."""
    cfg = run.cfg
    seed_everything(mix_seed(cfg.seed, run.run_seed, epoch, D.rank(), 3))  # drop path and Mixup draws
    augment = train_transform(run.img_size, cfg.crop_scale, cfg.hflip, cfg.auto_augment, cfg.random_erasing)
    loader = train_loader(run.shards, run.counts, augment, mix_seed(cfg.seed, run.run_seed), epoch, D.rank(), run.world,
                          cfg.shuffle_buffer, run.micro, cfg.num_workers)  # fmt: skip
    batches = iter(loader)
    run.model.train()
    losses, lrs = [], []
    for i in range(run.steps_per_epoch):
        step = epoch * run.steps_per_epoch + i
        lr = warmup_cosine(step / run.steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.peak_lr(), cfg.min_lr)
        for g in run.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        step_loss = torch.zeros((), device=run.device)
        for k in range(cfg.accum_steps):
            x, y = next(batches)
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            if run.mixup is not None:
                x, y = run.mixup(x, y)
            sync = k + 1 == cfg.accum_steps or run.world == 1
            with contextlib.nullcontext() if sync else net.no_sync():
                with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.autocast):
                    loss = run.criterion(net(x).float(), y) / cfg.accum_steps
                loss.backward()
            step_loss += loss.detach()
        if cfg.clip_grad is not None:
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        lrs.append(lr)
        bar.update()
    del batches
    host = D.mean_over_ranks(torch.stack(losses)).cpu()  # one host sync per epoch
    epoch_loss = float(host.mean())
    if not math.isfinite(epoch_loss):
        raise FinetuneError(f"finetune loss became {epoch_loss} in epoch {epoch + 1}: lower finetune base_lr "
                            f"({cfg.base_lr}) or set clip_grad")  # fmt: skip
    bar.set_postfix(loss=f"{epoch_loss:.4f}")
    return [{"step": epoch * run.steps_per_epoch + i + 1, "loss": float(host[i]), "lr": lrs[i], "epoch": epoch + 1}
            for i in range(run.steps_per_epoch)]  # fmt: skip
