"""Training loop of the in-pipeline iBOT teacher (single process; images held in memory).

With a :class:`~pipeline.resume.ResumeStore`, the whole training state (student, EMA teacher, the
loss's centres, optimiser, both generators, the curves) is saved at every epoch end, and a killed
run continues from the last good epoch to the same weights, bit for bit on CPU, as an unbroken run.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay
from tqdm import tqdm

from pipeline.config.teacher import TeacherTrainConfig
from pipeline.data.augment import block_masks, jitter, random_resized_crop
from pipeline.resume import ResumeStore
from pipeline.data.images import normalize
from pipeline.teacher.ibot import (
    IBOTHead,
    IBOTLoss,
    IBOTNetwork,
    cosine_schedule,
    ema_update,
    make_teacher,
)

__all__ = ["train_ibot"]

log = logging.getLogger(__name__)


def train_ibot(
    backbone: VisionTransformer,
    images: torch.Tensor,  # uint8 [N, 3, S, S]
    cfg: TeacherTrainConfig,
    device: torch.device,
    log_step: Optional[Callable[[int, dict], None]] = None,
    max_steps: Optional[int] = None,
    store: Optional[ResumeStore] = None,
    curve_rows: Optional[list] = None,
) -> tuple[VisionTransformer, dict]:
    """Train ``backbone`` with the iBOT objective; returns the EMA teacher's backbone and final stats.

    ``log_step(step, stats)`` is called once per epoch with the epoch's mean stats; the final stats add
    ``max_entropy`` and ``resumed_from_epoch`` (the epochs taken from ``store``, 0 for a fresh run). ``max_steps``
    stops early (tests); the schedules still span ``cfg.epochs``. ``store``: resume from / save to it at
    epoch ends; ``curve_rows``: the list ``log_step`` accumulates into, saved and restored with it.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, size = len(images), images.shape[-1]
    if n < cfg.batch_size:
        raise ValueError(f"teacher.train.batch_size={cfg.batch_size} exceeds the {n} training images")
    grid = tuple(backbone.patch_embed.grid_size)
    head = IBOTHead(backbone.embed_dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim)
    student = IBOTNetwork(backbone, head).to(device)
    teacher = make_teacher(student)
    criterion = IBOTLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum, cfg.patch_loss_weight).to(device)
    groups = param_groups_weight_decay(student, weight_decay=1.0, no_weight_decay_list=("mask_token",))
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))

    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    peak_lr = cfg.base_lr * cfg.batch_size / 256
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    freeze_steps = int(cfg.freeze_last_layer_epochs * steps_per_epoch)
    temp_warmup = int(cfg.warmup_teacher_temp_epochs * steps_per_epoch)
    images = images.to(device)
    last_layer = [p for name, p in student.named_parameters() if name.startswith("head.last_layer")]

    step, epoch_stats, stats, start_epoch = 0, [], {}, 0
    state = store.load() if store is not None else None
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        rng.bit_generator.state = state["numpy_generator"]
        start_epoch, step, stats = int(state["epoch"]), int(state["step"]), dict(state["stats"])
        if curve_rows is not None:
            curve_rows[:] = state["curves"]
    bar = tqdm(total=min(total, max_steps or total), initial=step, desc="train teacher (iBOT)", unit="step",
               mininterval=2.0)  # fmt: skip
    for epoch in range(start_epoch, cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            if max_steps is not None and step >= max_steps:
                break
            lr = cosine_schedule(peak_lr, cfg.min_lr, step, total, warmup)
            wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, step, total)
            momentum = cosine_schedule(cfg.momentum_teacher, 1.0, step, total)
            t_temp = cfg.teacher_temp
            if step < temp_warmup:
                t_temp = cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / temp_warmup
            for g in optimizer.param_groups:
                g["lr"] = lr
                g["weight_decay"] = wd if g["weight_decay"] > 0 else 0.0

            x = images[order[b * cfg.batch_size : (b + 1) * cfg.batch_size].to(device)].float() / 255
            bsz = x.shape[0]
            views = [normalize(jitter(random_resized_crop(x, size, cfg.global_scale, gen), cfg.jitter, gen)) for _ in range(2)]
            masks = block_masks(2 * bsz, grid, tuple(cfg.mask_ratio), rng).to(device)
            g_views = torch.cat(views)  # [2B, 3, S, S]
            with torch.no_grad():
                t_cls, t_patch = teacher(g_views)
            s_cls, s_patch = student(g_views, masks)
            s_cls_views = list(s_cls.chunk(2))
            if cfg.n_local_crops:
                local = torch.cat([
                    normalize(jitter(random_resized_crop(x, cfg.local_size, cfg.local_scale, gen), cfg.jitter, gen))
                    for _ in range(cfg.n_local_crops)
                ])  # fmt: skip
                s_cls_views += list(student.forward_cls(local).chunk(cfg.n_local_crops))
            out = criterion(
                s_cls_views, list(s_patch.chunk(2)), list(t_cls.chunk(2)), list(t_patch.chunk(2)),
                list(masks.chunk(2)), t_temp,
            )  # fmt: skip
            if not torch.isfinite(out["loss"]):
                raise FloatingPointError(f"iBOT loss is {out['loss'].item()} at step {step}; lower teacher.train.base_lr")
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
            if step < freeze_steps:
                for p in last_layer:
                    p.grad = None
            optimizer.step()
            ema_update(teacher, student, momentum)
            epoch_stats.append({k: v.item() for k, v in out.items()} | {"lr": lr, "momentum": momentum})
            step += 1
            bar.update()
        if epoch_stats:
            stats = {k: float(np.mean([s[k] for s in epoch_stats])) for k in epoch_stats[0]}
            stats["epoch"] = epoch + 1
            bar.set_postfix(loss=f"{stats['loss']:.3f}", H=f"{stats['teacher_entropy']:.2f}")
            if log_step is not None:
                log_step(step, stats)
            log.info("epoch %d/%d %s", epoch + 1, cfg.epochs, {k: round(v, 4) for k, v in stats.items()})
            epoch_stats = []
            if store is not None and (max_steps is None or step < max_steps):
                store.save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                            "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
                            "generator": gen.get_state(), "numpy_generator": rng.bit_generator.state,
                            "epoch": epoch + 1, "step": step, "stats": stats, "curves": list(curve_rows or [])})  # fmt: skip
        if max_steps is not None and step >= max_steps:
            break
    bar.close()
    stats["max_entropy"] = math.log(cfg.out_dim)
    stats["resumed_from_epoch"] = start_epoch  # > 0: this run continued a killed one (less work than a fresh run)
    return teacher.backbone.eval(), stats
