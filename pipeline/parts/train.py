"""Training and inference of the part learner on cached teacher features (single process).

With a :class:`~pipeline.resume.ResumeStore` the training state (model, optimiser, batch-order
generator, curves) is saved at every epoch end and a killed run continues to the same weights.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config.parts import PartsConfig
from pipeline.parts.model import PartLearner, diversity_loss, usage_loss
from pipeline.resume import ResumeStore
from pipeline.teacher.ibot import cosine_schedule

__all__ = ["build_part_learner", "train_part_learner", "part_ids", "reconstruction_targets"]

log = logging.getLogger(__name__)


def build_part_learner(cfg: PartsConfig, dim: int, grid: tuple[int, int], image_size: int,
                       tokens: Optional[str] = None) -> PartLearner:  # fmt: skip
    """The part learner of ``cfg`` (its token form, or ``tokens`` when given), seeded by ``parts.seed``."""
    torch.manual_seed(cfg.seed)
    return PartLearner(dim, grid, cfg.num_parts, image_size, cfg.decoder_channels, cfg.style_dim,
                       cfg.blur_size, cfg.blur_sigma, temperature=cfg.temperature, tokens=tokens or cfg.tokens)  # fmt: skip


def reconstruction_targets(images: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, 3, S, S]`` -> float in [-1, 1], the decoder's target."""
    return images.float() / 127.5 - 1


def losses(model: PartLearner, cls: torch.Tensor, patches: torch.Tensor, images: torch.Tensor, cfg: PartsConfig) -> dict:
    out = model(cls, patches)
    rec = F.l1_loss(out["recon"], reconstruction_targets(images))
    div = diversity_loss(out["maps"])
    use = usage_loss(out["maps"], cfg.min_share)
    return {"loss": rec + cfg.diversity_weight * div + cfg.usage_weight * use, "recon": rec, "diversity": div, "usage": use}


def train_part_learner(
    model: PartLearner, cls: torch.Tensor, patches: torch.Tensor, images: torch.Tensor, cfg: PartsConfig,
    device: torch.device, log_epoch: Optional[Callable[[int, dict], None]] = None, desc: str = "train parts",
    store: Optional[ResumeStore] = None, curve_rows: Optional[list] = None,
) -> dict:  # fmt: skip
    """Fit ``model`` to ``cls [N, C]``, ``patches [N, L, C]`` (teacher features) and ``images [N, 3, S, S]`` uint8.

    Returns the last epoch's mean losses, ``epoch`` and ``resumed_from_epoch`` (the epochs taken from
    ``store``, 0 for a fresh run)."""
    n = len(cls)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs
    total = steps_per_epoch * cfg.epochs
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, stats, start_epoch = 0, {}, 0
    state = store.load() if store is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start_epoch, step, stats = int(state["epoch"]), int(state["step"]), dict(state["stats"])
        if curve_rows is not None:
            curve_rows[:] = state["curves"]
    bar = tqdm(total=total, initial=step, desc=desc, unit="step", mininterval=1.0)
    trained = 0
    for epoch in range(start_epoch, cfg.epochs):
        trained += 1
        order = torch.randperm(n, generator=gen)
        sums: dict[str, float] = {}
        for b in range(steps_per_epoch):
            idx = order[b * bs : (b + 1) * bs]
            for g in opt.param_groups:
                g["lr"] = cosine_schedule(cfg.lr, 0.0, step, total)
            out = losses(model, cls[idx].to(device), patches[idx].to(device), images[idx].to(device), cfg)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            step += 1
            bar.update()
        stats = {k: v / steps_per_epoch for k, v in sums.items()} | {"epoch": epoch + 1}
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
        if log_epoch is not None:
            log_epoch(step, stats)
        if store is not None:
            store.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                        "epoch": epoch + 1, "step": step, "stats": stats, "curves": list(curve_rows or [])})  # fmt: skip
    bar.close()
    log.info("%s: %d of %d epochs trained in this run", desc, trained, cfg.epochs)
    return {**stats, "resumed_from_epoch": start_epoch}


@torch.no_grad()
def part_ids(model: PartLearner, cls: torch.Tensor, patches: torch.Tensor, grid: Optional[tuple[int, int]] = None,
             batch_size: int = 512) -> torch.Tensor:  # fmt: skip
    """Argmax part id per patch ``uint8 [N, H, W]``; soft maps are resized (bilinear) to ``grid`` first if given."""
    model.eval()
    out = []
    for i in range(0, len(cls), batch_size):
        maps = model.part_logits(cls[i : i + batch_size].float(), patches[i : i + batch_size].float()).softmax(1)
        if grid is not None and tuple(grid) != tuple(maps.shape[-2:]):
            maps = F.interpolate(maps, size=tuple(grid), mode="bilinear", align_corners=False)
        out.append(maps.argmax(1).to(torch.uint8))
    return torch.cat(out)
