"""MAE pretraining on ``export_parts`` shards: one run of one masking variant, resumable, DDP-ready.

MAE's recipe: AdamW(betas) with weight decay on weight matrices only, lr = base_lr x global batch / 256,
linear warm-up then a per-iteration half-cycle cosine to ``min_lr``, bf16 autocast on CUDA.
Randomness is derived from ``(seed, epoch, rank)`` at each epoch start (loader and masking), and a
resume checkpoint is written at epoch ends, so a run resumed from a checkpoint continues exactly
as the unbroken run would have (bit for bit on CPU).

Layout: ``pretrain`` runs ``_set_up`` (process group, device, batch checks, model, optimiser), restores
a resume checkpoint (``_load_checkpoint``), then per epoch ``_train_epoch``, whose optimiser step is
``_train_step`` (accumulated micro-batches from ``_batch_inputs``: decoding, normalising, masking), and
``_save_checkpoint``; rank 0 finally calls ``_write_outputs``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from timm.optim import param_groups_weight_decay
from tqdm import tqdm

from pipeline import distributed as D
from pipeline.config.base import resolved_config
from pipeline.config.pretrain import PretrainConfig
from pipeline.data.images import normalize
from pipeline.data.shards import PARTS_FORMAT, ShardFormatError, ShardSizeError, read_index, shard_entries
from pipeline.errors import PipelineError
from pipeline.io import atomic_output_dir, atomic_write_bytes, ensure_free_space, file_sha256, json_bytes
from pipeline.mae.data import make_loader, require_attention
from pipeline.mae.decode import EncodedImages, decode_crop
from pipeline.mae.masking import Masking, curriculum_alpha, noise_size
from pipeline.mae.strategies import loader_guide, make_masking
from pipeline.mae.model import MaskedAutoencoder, build_mae
from pipeline.models.checkpoint import save_backbone, save_timm_export
from pipeline.resume import ResumeStore, fingerprint
from pipeline.schedule import warmup_cosine

__all__ = ["build_mae", "lr_at", "alpha_at", "seeded_generator", "pretrain", "save_state", "TrainingError"]

log = logging.getLogger(__name__)


class TrainingError(PipelineError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


def lr_at(cfg: PretrainConfig, step: int, steps_per_epoch: int) -> float:
    """Per-iteration lr: linear warm-up to ``peak_lr`` over ``warmup_epochs``, then half-cycle cosine to ``min_lr``."""
    return warmup_cosine(step / steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.peak_lr(), cfg.min_lr)


def alpha_at(cfg: PretrainConfig, step: int, steps_per_epoch: int) -> float:
    """The curriculum's alpha at optimiser ``step`` (see ``curriculum_unit``); 0 for the strategies other than
    semantic masking (the curriculum is semantic-only)."""
    if cfg.masking != "semantic":
        return 0.0
    if cfg.curriculum_unit == "epoch":
        progress = (step // steps_per_epoch + 1) / cfg.epochs
    else:
        progress = step / (steps_per_epoch * cfg.epochs)
    return curriculum_alpha(progress, cfg.schedule, cfg.gamma, cfg.alpha)


def seeded_generator(device: torch.device, *seeds: int) -> torch.Generator:
    seed = 0
    for s in seeds:
        seed = (seed * 1_000_003 + s) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError)."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc)


def out_of_memory_advice(cfg: PretrainConfig, micro: int, world: int, device: torch.device) -> str:
    """What to change when a micro-batch does not fit: accumulation keeps the global batch and the lr."""
    more = cfg.accum_steps * 2
    fits = cfg.batch_size % (world * more) == 0
    step = (f"set pretrain accum_steps: {more} (micro-batch {cfg.batch_size // (world * more)} images per rank; "
            "the global batch and the lr stay the same)") if fits else (
            f"set pretrain accum_steps to a divisor of batch_size / ranks = {cfg.batch_size // world} above "
            f"{cfg.accum_steps}")  # fmt: skip
    return (f"pretrain ran out of {device.type} memory with a micro-batch of {micro} images per rank (batch_size "
            f"{cfg.batch_size} / ({world} rank(s) x accum_steps {cfg.accum_steps})): {step}, or lower batch_size")


def _check_shards(cfg: PretrainConfig, part_shards: Path) -> dict:
    index = read_index(part_shards, PARTS_FORMAT)
    if cfg.masking == "attention":
        require_attention(index, part_shards)
    grid = index["grid"][0]
    if grid != cfg.grid:
        raise ShardFormatError(
            f"{part_shards}/index.json: part maps are {grid}x{grid} but the MAE grid is img_size/patch_size = "
            f"{cfg.img_size}/{cfg.patch_size} = {cfg.grid}: set export_parts.grid to {cfg.grid} (or change pretrain)"
        )
    return index


def _train_shards(cfg: PretrainConfig, part_shards: Path) -> tuple[list[str], list[int]]:
    """The train shards and their index counts; a shard whose size differs from the index fails here,
    before any compute, unless on_corrupt=skip (then its missing samples are counted as they are met)."""
    try:
        entries = shard_entries(part_shards, "train", PARTS_FORMAT, url=cfg.shards_url)
    except ShardSizeError as exc:
        if cfg.on_corrupt != "skip":
            raise
        log.warning("%s (pretrain on_corrupt=skip: reading them anyway)", exc)
        entries = shard_entries(part_shards, "train", PARTS_FORMAT, url=cfg.shards_url, check_sizes=False)
    return [e.path for e in entries], [e.num_samples for e in entries]


def skip_report(cfg: PretrainConfig, skipped: int, read: int, examples: list[str]) -> Optional[str]:
    """The error when the skipped share of the samples read so far exceeds ``max_skip_fraction``."""
    if skipped == 0 or skipped <= cfg.max_skip_fraction * read:
        return None
    return (f"pretrain skipped {skipped} corrupt sample(s) of {read} read ({skipped / read:.2%}), more than "
            f"pretrain.max_skip_fraction={cfg.max_skip_fraction}; first: {examples[:3]}. Repair the part shards "
            "(`dvc checkout data/part_shards`, `dvc pull`, or `dvc repro -f export_parts`) or raise the limit")


@dataclass
class _Run:
    """What set-up builds for one run, read by the epochs, the resume checkpoints and the outputs."""

    cfg: PretrainConfig
    part_shards: Path
    num_parts: int
    shards: list[str]  # the train shards and their index counts
    counts: list[int]
    device: torch.device
    world: int  # ranks
    micro: int  # images per rank in one forward pass: batch_size / (world x accum_steps)
    steps_per_epoch: int
    autocast: bool  # bf16 autocast
    noise_dim: int  # the loader's per-sample masking noise
    model: MaskedAutoencoder  # the bare model: its weights are saved, checkpointed and restored
    opt: torch.optim.Optimizer
    store: ResumeStore

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs


@dataclass
class _Progress:
    """What a resume checkpoint carries besides the weights and the optimiser."""

    epoch: int = 0  # epochs completed
    skipped: int = 0  # corrupt samples skipped / samples read, over all ranks (on_corrupt=skip)
    read: int = 0
    examples: list[str] = field(default_factory=list)  # this rank's first skipped samples


def pretrain(
    cfg: PretrainConfig, part_shards: str | Path, out_dir: str | Path, resume_dir: str | Path,
    log_row: Optional[Callable[[int, dict], None]] = None, curve_rows: Optional[list] = None,
) -> dict:  # fmt: skip
    """Pretrain one variant; write ``encoder.pth`` (timm ViT, official iBOT-style ``{'state_dict'}``),
    ``mae.pth`` (whole model), ``config.json`` and ``meta.json`` into ``out_dir`` (rank 0, atomically).

    ``log_row(step, stats)`` receives rank 0's curve rows; ``curve_rows`` is the list they accumulate in,
    saved with each resume checkpoint and restored into it on resume. Returns the run's metrics.
    """
    run = _set_up(cfg, Path(part_shards), out_dir, resume_dir)
    progress = _load_checkpoint(run, curve_rows)
    start_epoch = progress.epoch
    net = _training_module(run)
    bar = tqdm(total=run.total_steps, initial=start_epoch * run.steps_per_epoch, desc=f"pretrain {cfg.masking}",
               unit="step", disable=not D.is_main(), mininterval=1.0)  # fmt: skip
    epoch_loss = float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        epoch_loss = _train_epoch(run, net, epoch, progress, bar, log_row)
        progress.epoch = epoch + 1
        if D.is_main() and (progress.epoch % cfg.checkpoint_every == 0 or progress.epoch == cfg.epochs):
            _save_checkpoint(run, progress, curve_rows)
        D.barrier()
    bar.close()

    result: dict = {}
    if D.is_main():
        result = _write_outputs(run, progress, start_epoch, epoch_loss, out_dir)
        run.store.clear()
    D.barrier()
    D.cleanup()
    return result


# set-up


def _set_up(cfg: PretrainConfig, part_shards: Path, out_dir: str | Path, resume_dir: str | Path) -> _Run:
    """Everything before the first step: the shard checks, the process group and device, the batch
    arithmetic, the free-space checks, the model, its optimiser and the resume store."""
    index = _check_shards(cfg, part_shards)
    num_parts = int(index["num_parts"])
    shards, counts = _train_shards(cfg, part_shards)
    n_train = index["splits"]["train"]["num_samples"]
    D.init_distributed()
    device = D.device_for_rank()
    world = D.world_size()
    if cfg.batch_size % (world * cfg.accum_steps):
        split = world * cfg.accum_steps
        below = cfg.batch_size // split * split
        near = f"{below} or {below + split}" if below else str(split)
        raise TrainingError(
            f"pretrain batch_size={cfg.batch_size} (the global batch) is not divisible by {world} rank(s) x "
            f"accum_steps={cfg.accum_steps} = {split}: set batch_size to a multiple of {split} (e.g. {near}), or "
            "change accum_steps or the number of ranks"
        )
    micro = cfg.batch_size // (world * cfg.accum_steps)
    steps_per_epoch = cfg.steps_per_epoch or n_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"pretrain batch_size={cfg.batch_size} exceeds the {n_train} train images: lower it")
    autocast = device.type == "cuda" if cfg.precision == "auto" else cfg.precision == "bf16"

    model = build_mae(cfg).to(device)
    state_bytes = 3 * 4 * sum(p.numel() for p in model.parameters())  # fp32 weights + AdamW's two moments
    ensure_free_space(resume_dir, 2 * state_bytes, "pretrain's resume checkpoints (last.pth + prev.pth)")
    ensure_free_space(out_dir, state_bytes, "pretrain's outputs (encoder.pth, mae.pth)")
    no_decay = {"encoder.cls_token", "encoder.pos_embed", "mask_token", "decoder_pos_embed"}
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=no_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.peak_lr(), betas=tuple(cfg.betas), fused=device.type == "cuda")
    return _Run(cfg, part_shards, num_parts, shards, counts, device, world, micro, steps_per_epoch, autocast,
                noise_size(cfg.grid * cfg.grid, num_parts), model, opt,
                _resume_store(cfg, part_shards, resume_dir))  # fmt: skip


def _training_module(run: _Run) -> torch.nn.Module:
    """The model as the steps call it: DDP-wrapped over several ranks, compiled if asked. Built after the
    resume state is loaded, so DDP's initial broadcast sends the restored weights."""
    net = torch.nn.parallel.DistributedDataParallel(run.model) if run.world > 1 else run.model
    return torch.compile(net) if run.cfg.compile else net


def _epoch_loader(run: _Run, epoch: int):
    """Epoch ``epoch``'s loader: ``steps_per_epoch x accum_steps`` micro-batches, seeded by (seed, epoch)."""
    cfg = run.cfg
    guide, block = loader_guide(cfg)
    return make_loader(run.shards, run.num_parts, cfg.img_size, cfg.grid, run.micro,
                       run.steps_per_epoch * cfg.accum_steps, epoch, cfg.seed, cfg.crop_scale, cfg.crop_ratio,
                       cfg.hflip, cfg.shuffle_buffer, cfg.num_workers, cfg.loader_streams, run.noise_dim, cfg.decode,
                       run.counts, cfg.on_corrupt, guide=guide, block=block)  # fmt: skip


# one epoch


def _train_epoch(run: _Run, net: torch.nn.Module, epoch: int, progress: _Progress, bar: tqdm,
                 log_row: Optional[Callable[[int, dict], None]]) -> float:  # fmt: skip
    """Train epoch ``epoch`` (0-based) and return its loss (mean over its steps and the ranks).

    The step losses stay on the device until the epoch ends: then one host sync, the corrupt-sample
    count (on_corrupt=skip), rank 0's curve rows every ``log_every`` steps, and the NaN check."""
    cfg = run.cfg
    run.model.train()
    loader = _epoch_loader(run, epoch)
    batches = iter(loader)
    losses, rows = [], []
    for i in range(run.steps_per_epoch):
        step = epoch * run.steps_per_epoch + i
        step_loss, lr, alpha = _train_step(run, net, batches, step)
        losses.append(step_loss)
        bar.update()
        if (step + 1) % cfg.log_every == 0:
            rows.append((step + 1, len(losses) - 1, lr, alpha))
    losses_host = D.mean_over_ranks(torch.stack(losses)).cpu()  # the epoch's one host sync: none in the steps
    epoch_loss = float(losses_host.mean())
    if cfg.on_corrupt == "skip":
        _count_skipped(run, loader, epoch, progress)
    if log_row is not None and D.is_main():
        for step_no, i, lr, alpha in rows:
            log_row(step_no, {"loss": float(losses_host[i]), "lr": lr, "alpha": alpha, "epoch": epoch + 1})
    if not math.isfinite(epoch_loss):
        bad = next((i for i, v in enumerate(losses_host.tolist()) if not math.isfinite(v)), 0)
        raise TrainingError(
            f"pretrain loss became {float(losses_host[bad])} at step {epoch * run.steps_per_epoch + bad + 1} (epoch "
            f"{epoch + 1}): lower pretrain base_lr ({cfg.base_lr}, peak lr {cfg.peak_lr():.3g}), lengthen "
            f"warmup_epochs ({cfg.warmup_epochs}) or set clip_grad; no output was written"
        )
    bar.set_postfix(loss=f"{epoch_loss:.4f}")
    return epoch_loss


def _train_step(run: _Run, net: torch.nn.Module, batches, step: int) -> tuple[torch.Tensor, float, float]:
    """One optimiser step (global ``step``, 0-based): the schedule's lr and alpha, ``accum_steps``
    micro-batches forward and backward (DDP syncs the gradients on the last), clipping, AdamW.
    Returns the step's loss (a device tensor), its lr and its alpha."""
    cfg = run.cfg
    lr, alpha = lr_at(cfg, step, run.steps_per_epoch), alpha_at(cfg, step, run.steps_per_epoch)
    for g in run.opt.param_groups:
        g["lr"] = lr
    step_loss = torch.zeros((), device=run.device)
    for k in range(cfg.accum_steps):
        x, masking = _batch_inputs(run, next(batches), alpha)
        sync = k == cfg.accum_steps - 1 or run.world == 1
        ctx = net.no_sync() if not sync else contextlib.nullcontext()
        try:
            with ctx, torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.autocast):
                loss, _ = net(x, masking)
                (loss / cfg.accum_steps).backward()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise TrainingError(out_of_memory_advice(cfg, run.micro, run.world, run.device)) from None
        step_loss += loss.detach() / cfg.accum_steps
    if cfg.clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return step_loss, lr, alpha


def _batch_inputs(run: _Run, batch, alpha: float) -> tuple[torch.Tensor, Masking]:
    """A loader micro-batch on the device: the normalised images (decoded here with decode: device)
    and their masking (from the part maps at curriculum ``alpha`` and the loader's noise)."""
    images, parts, _, noise, *guide = batch
    if isinstance(images, EncodedImages):  # decode: device
        images = decode_crop(images, run.cfg.img_size, run.device)
    x = normalize(images.to(run.device, non_blocking=True).float() / 255)
    masking = make_masking(run.cfg, parts.to(run.device, non_blocking=True), alpha, run.num_parts,
                           noise=noise.to(run.device, non_blocking=True),
                           guide=guide[0].to(run.device, non_blocking=True) if guide else None)  # fmt: skip
    return x, masking


def _count_skipped(run: _Run, loader, epoch: int, progress: _Progress) -> None:
    """Add the epoch's corrupt samples (on_corrupt=skip) to ``progress``; fail past ``max_skip_fraction``."""
    cfg = run.cfg
    local = sum(c for c, _ in loader.skipped)
    progress.skipped += int(D.sum_over_ranks(torch.tensor(local, dtype=torch.int64, device=run.device)))
    progress.read += run.steps_per_epoch * cfg.batch_size
    progress.examples = (progress.examples + [reason for _, reason in loader.skipped])[:5]  # this rank's first ones
    if local:
        log.warning("pretrain epoch %d: skipped %d corrupt sample(s) on rank %d, e.g. %s", epoch + 1, local,
                    D.rank(), loader.skipped[0][1])  # fmt: skip
    problem = skip_report(cfg, progress.skipped, progress.read + progress.skipped, progress.examples)
    if problem:
        raise TrainingError(problem)


# resume checkpoints


def _resume_store(cfg: PretrainConfig, part_shards: Path, resume_dir: str | Path) -> ResumeStore:
    """The run's resume checkpoints, tied to its resolved config, its shards' index and this package's code."""
    code = [Path(__file__).with_name(n).read_bytes() for n in ("data.py", "decode.py", "masking.py", "model.py", "strategies.py", "train.py")]
    return ResumeStore(resume_dir, fingerprint(resolved_config(cfg, "pretrain"), file_sha256(part_shards / "index.json"),
                                               *code))  # fmt: skip


def _load_checkpoint(run: _Run, curve_rows: Optional[list]) -> _Progress:
    """Restore the model, the optimiser and ``curve_rows`` from the newest resume checkpoint, if any;
    returns the progress it saved (epoch 0 when there is none)."""
    state = run.store.load()  # every rank reads the same file (a shared filesystem under multi-node DDP)
    if state is None:
        return _Progress()
    if run.cfg.loader_streams is None and state.get("world_size") != run.world:
        log.warning("resuming a run saved with %s rank(s) on %s: with loader_streams null the data order from "
                    "here on differs from an unbroken run's", state.get("world_size"), run.world)  # fmt: skip
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    if curve_rows is not None:
        curve_rows[:] = state.get("curves", [])
    return _Progress(int(state["epoch"]), int(state.get("skipped", 0)), int(state.get("read", 0)),
                     list(state.get("skip_examples", [])))  # fmt: skip


def _save_checkpoint(run: _Run, progress: _Progress, curve_rows: Optional[list]) -> None:
    """Rank 0, at an epoch end: the resume checkpoint (weights, optimiser, progress, curve rows so far)."""
    run.store.save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "epoch": progress.epoch,
                    "curves": list(curve_rows or []), "world_size": run.world, "skipped": progress.skipped,
                    "read": progress.read, "skip_examples": progress.examples})  # fmt: skip


# outputs


def _write_outputs(run: _Run, progress: _Progress, start_epoch: int, epoch_loss: float, out_dir: str | Path) -> dict:
    """Rank 0: ``encoder.pth``, ``mae.pth``, ``config.json`` and ``meta.json`` into ``out_dir``, atomically;
    returns the run's metrics. ``meta.json`` is the same whether the run was resumed or not."""
    cfg = run.cfg
    result = {"variant_masking": cfg.masking, "final_loss": None if math.isnan(epoch_loss) else epoch_loss,
              "epochs": cfg.epochs, "steps": run.total_steps, "images_seen": run.total_steps * cfg.batch_size,
              "skipped_samples": progress.skipped, "skipped_examples": progress.examples,
              "resumed_from_epoch": start_epoch}  # fmt: skip
    meta = {"arch": cfg.arch, "img_size": cfg.img_size, "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim,
            "depth": cfg.depth, "num_heads": cfg.num_heads, "masking": cfg.masking, "seed": cfg.seed,
            "num_parts": run.num_parts, "part_shards_index_sha256": file_sha256(run.part_shards / "index.json"),
            **{k: v for k, v in result.items() if k not in ("resumed_from_epoch", "skipped_examples")}}  # fmt: skip
    with atomic_output_dir(out_dir) as tmp:
        save_backbone(run.model.encoder, tmp / "encoder.pth", dtype=torch.float32)
        save_timm_export(run.model.encoder, tmp / "timm", cfg.arch,  # timm.create_model("local-dir:<out>/timm")
                         {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim,
                          "depth": cfg.depth, "num_heads": cfg.num_heads})  # fmt: skip
        save_state(run.model, tmp / "mae.pth")
        (tmp / "config.json").write_bytes(resolved_config(cfg, "pretrain"))
        (tmp / "meta.json").write_bytes(json_bytes(meta))
    return result


def save_state(model: torch.nn.Module, path: Path) -> None:
    """The whole model (encoder and decoder) as ``{'model': state_dict}``, fp32, atomically."""
    buf = io.BytesIO()
    torch.save({"model": {k: v.detach().cpu() for k, v in sorted(model.state_dict().items())}}, buf)
    atomic_write_bytes(path, buf.getvalue())
