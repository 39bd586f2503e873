"""Config of the ``pretrain`` stage: ``pretrain.common`` merged with one ``pretrain.variants`` entry."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, model_validator

from pipeline.config.base import (
    ConfigError,
    StageConfig,
    format_error,
    ordered_pair,
    read_section,
)

__all__ = ["PretrainConfig", "load_pretrain_config", "pretrain_runs", "valid_seeds"]


class PretrainConfig(StageConfig):
    """``pretrain``: one MAE pretraining run (``pretrain.common`` merged with one ``pretrain.variants`` entry)."""

    # encoder (a timm ViT; its weights load into timm.create_model(arch, <these overrides>)) and decoder
    arch: str = Field("vit_tiny_patch16_224", min_length=1, description="timm ViT name of the encoder.")
    img_size: int = Field(32, gt=0, description="Training resolution (RandomResizedCrop output).")
    patch_size: int = Field(4, gt=0)
    embed_dim: int = Field(192, gt=0)
    depth: int = Field(6, gt=0)
    num_heads: int = Field(3, gt=0)
    decoder_embed_dim: int = Field(128, gt=0)
    decoder_depth: int = Field(2, gt=0)
    decoder_num_heads: int = Field(4, gt=0)
    norm_pix_loss: bool = Field(True, description="Targets normalised by each patch's own mean and variance.")
    loss_target: Literal["input", "pixels"] = Field(
        "pixels", description="input: patches of the ImageNet-normalised model input (MAE's code); pixels: patches of "
        "the [0, 1] pixels (a grey image then has colourless targets; see docs/stages.md, pretrain figures).")
    # masking
    masking: Literal["semantic", "random", "block", "attention"] = Field(
        "semantic", description="semantic: SemMAE's part-guided masking; random: plain MAE; block: BEiT's blockwise "
        "masking; attention: AttMask, by the teacher's CLS attention stored in the part shards (docs/method.md)."
    )
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    attention_mode: Literal["high", "low", "hint"] = Field(
        "hint", description="masking=attention only. high: mask the most attended patches; low: the least attended; "
        "hint: the most attended, but reveal a random share of the top ones (AttMask-Hint, the AttMask code's default)."
    )
    hint_share: float = Field(
        0.1, ge=0, lt=1, description="attention_mode=hint: the top share of patches the hints are drawn from "
        "(AttMask's show_max); hint_share x mask_ratio of all patches are revealed from it."
    )
    block_min_patches: int = Field(16, gt=0, description="masking=block: the smallest block, in patches (BEiT: 16).")
    block_min_aspect: float = Field(
        0.3, gt=0, le=1, description="masking=block: block aspect ratios are log-uniform in [this, 1/this] (BEiT: 0.3)."
    )
    schedule: Literal["curriculum", "reversed", "fixed"] = Field(
        "curriculum", description="semantic only. alpha = (t/T)^gamma, 1 - (t/T)^gamma, or the fixed alpha."
    )
    gamma: float = Field(2.0, gt=0, description="Exponent of the curriculum.")
    alpha: float = Field(0.0, ge=0, le=1, description="schedule=fixed: 0 = a share inside every part, 1 = whole parts.")
    curriculum_unit: Literal["iteration", "epoch"] = Field(
        "iteration", description="t/T per iteration (step/total steps) or per epoch ((epoch+1)/epochs, the authors')."
    )
    # optimisation (MAE's recipe)
    epochs: int = Field(6, gt=0)
    warmup_epochs: float = Field(1.0, ge=0)
    batch_size: int = Field(128, gt=0, description="Global batch: over all ranks and accumulation steps.")
    accum_steps: int = Field(1, gt=0, description="Gradient accumulation: micro-batch = batch_size / (ranks * accum_steps).")
    steps_per_epoch: Optional[int] = Field(None, gt=0, description="Optimiser steps per epoch; null = train images // batch_size.")
    base_lr: float = Field(1.5e-3, gt=0, description="AdamW peak lr = base_lr * batch_size / 256 (MAE: 1.5e-4 at 800 epochs).")
    min_lr: float = Field(0.0, ge=0, description="End of the per-iteration half-cycle cosine.")
    weight_decay: float = Field(0.05, ge=0, description="None on biases, norms, tokens and position embeddings.")
    betas: list[float] = Field([0.9, 0.95], min_length=2, max_length=2)
    clip_grad: Optional[float] = Field(None, gt=0)
    # data
    crop_scale: list[float] = Field([0.2, 1.0], min_length=2, max_length=2, description="RandomResizedCrop area range.")
    crop_ratio: list[float] = Field([0.75, 4 / 3], min_length=2, max_length=2, description="RandomResizedCrop aspect range.")
    hflip: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip (image and part map together).")
    shuffle_buffer: int = Field(1000, ge=1, description="Samples in each loader stream's shuffle buffer.")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes per rank (0 = in the training process).")
    loader_streams: Optional[int] = Field(
        None, gt=0, description="Independent data streams (each its own shards and seed); a fixed number makes the batches "
        "the same on any number of GPUs. null = ranks x max(1, num_workers). Must divide by ranks x workers.",
    )
    shards_url: Optional[str] = Field(
        None, min_length=1, description="Read the shards from this WebDataset URL template ({path} = "
        "<split>/<file>) instead of the part-shard directory, e.g. 'pipe:aws s3 cp s3://bucket/part_shards/{path} -'.",
    )
    decode: Literal["cpu", "device"] = Field(
        "cpu", description="cpu: loader workers decode and crop with PIL; device: workers only read the shards, "
        "JPEGs are decoded (nvJPEG on CUDA) and cropped on the training device (pipeline/mae/decode.py).",
    )
    # runtime
    on_corrupt: Literal["fail", "skip"] = Field(
        "fail", description="A corrupt sample or truncated shard: fail naming the shard and sample key, or skip it, "
        "count it in the metrics (skipped_samples) and fail only past max_skip_fraction."
    )  # fmt: skip
    max_skip_fraction: float = Field(
        0.001, ge=0.0, le=1.0, description="With on_corrupt=skip: fail when the skipped share of the samples read "
        "so far exceeds this (checked at every epoch end)."
    )  # fmt: skip
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    compile: bool = Field(False, description="torch.compile the model (worth it on GPUs for long runs).")
    checkpoint_every: int = Field(1, gt=0, description="Epochs between resume checkpoints (the last epoch always).")
    log_every: int = Field(1, gt=0, description="Steps between rows of the training curves.")
    num_figure_images: int = Field(8, gt=0, le=64, description="Validation images in the figures.")
    seed: int = Field(0, ge=0, description="Set per run from pretrain.seeds; not a key of common/variants.")

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        for key in ("crop_scale", "crop_ratio"):
            ordered_pair(getattr(self, key), key)
            if getattr(self, key)[0] <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be positive")
        if self.crop_scale[1] > 1:
            raise ValueError(f"crop_scale={self.crop_scale} must lie in (0, 1]")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={self.betas} must lie in [0, 1)")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of accum_steps={self.accum_steps}")
        for dim, heads, key in ((self.embed_dim, self.num_heads, "embed_dim"),
                                (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim")):  # fmt: skip
            if dim % heads:
                head_key = key.replace("embed_dim", "num_heads")
                raise ValueError(f"{key}={dim} is not a multiple of {head_key}={heads}")
        if self.shards_url is not None and "{path}" not in self.shards_url:
            raise ValueError(f"shards_url={self.shards_url!r} has no '{{path}}' placeholder")
        masked = self.grid**2 - int(self.grid**2 * (1 - self.mask_ratio))
        if self.masking == "block" and self.block_min_patches > masked:
            raise ValueError(f"block_min_patches={self.block_min_patches} exceeds the {masked} patches masked per image "
                             f"({self.grid}x{self.grid} grid, mask_ratio={self.mask_ratio}): lower it")
        keep = self.grid**2 - masked
        reveal = int(self.hint_share * self.mask_ratio * self.grid**2)
        if self.masking == "attention" and self.attention_mode == "hint" and reveal > keep:
            raise ValueError(f"hint_share={self.hint_share} reveals {reveal} hints, more than the {keep} visible patches "
                             f"({self.grid}x{self.grid} grid, mask_ratio={self.mask_ratio}): lower hint_share")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}")
        return self

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def peak_lr(self) -> float:
        return self.base_lr * self.batch_size / 256


_VARIANT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def load_pretrain_config(params_path: str | Path, variant: Optional[str], seed: int) -> PretrainConfig:
    """The run ``variant`` x ``seed``: ``pretrain.common`` overridden by ``pretrain.variants.<variant>``
    (``variant=None``: ``pretrain.common`` alone, e.g. for the shape of the random-encoder reference).

    Also checks the section's shape (``seeds``, ``common``, ``variants``) so that a typo anywhere in
    it fails every pretrain run, with the key named where it was written.
    """
    path = Path(params_path)
    section = read_section(path, "pretrain")
    unknown = sorted(set(section) - {"seeds", "common", "variants"})
    if unknown:
        raise ConfigError(f"{path}: unknown key 'pretrain.{unknown[0]}'; allowed keys: common, seeds, variants")
    seeds = section.get("seeds", [0])
    # reported with the errors of the run's keys below, so that one look at the file shows them all
    problems = [] if valid_seeds(seeds) else [f"{path}: 'pretrain.seeds' = {seeds!r} is invalid: a non-empty list "
                                              "of distinct integers >= 0, e.g. [0] or [0, 1, 2]"]  # fmt: skip
    common = section.get("common") or {}
    variants = section.get("variants") or {}
    for key, value in (("pretrain.common", common), ("pretrain.variants", variants)):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: '{key}' must be a mapping, got {value!r}")
    for name, over in variants.items():
        if not isinstance(name, str) or not _VARIANT_NAME.match(name):
            raise ConfigError(f"{path}: variant name 'pretrain.variants.{name}' must match [a-z][a-z0-9_]*")
        if over is not None and not isinstance(over, dict):
            raise ConfigError(f"{path}: 'pretrain.variants.{name}' must be a mapping of overrides, got {over!r}")
    if variant is not None and variant not in variants:
        raise ConfigError(f"{path}: no variant 'pretrain.variants.{variant}' (has {sorted(variants)})")
    over = (variants[variant] or {}) if variant is not None else {}
    for where, data in (("pretrain.common", common), (f"pretrain.variants.{variant}", over)):
        if "seed" in data:
            raise ConfigError(f"{path}: '{where}.seed' is not allowed: list the seeds in 'pretrain.seeds'")
    try:
        cfg = PretrainConfig.model_validate({**common, **over, "seed": seed})
    except ValidationError as exc:
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else ""
            where = f"pretrain.variants.{variant}" if key in over else "pretrain.common"
            problems.append(format_error(path, where, PretrainConfig, err))
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def valid_seeds(seeds: object) -> bool:
    """``pretrain.seeds`` is a non-empty list of distinct integers >= 0 (each names a run: ``<variant>-<seed>``)."""
    return (isinstance(seeds, list) and bool(seeds) and all(type(s) is int and s >= 0 for s in seeds)
            and len(set(seeds)) == len(seeds))  # fmt: skip


def pretrain_runs(params_path: str | Path) -> tuple[dict[str, dict], list[int]]:
    """``(variants -> their overrides, seeds)`` of the ``pretrain`` section, every run's config validated."""
    load_pretrain_config(params_path, None, 0)  # the section's shape and seeds, and pretrain.common alone
    section = read_section(Path(params_path), "pretrain")
    variants = section.get("variants") or {}
    seeds = section.get("seeds", [0])
    for v in variants:
        for s in seeds:
            load_pretrain_config(params_path, v, s)  # raises ConfigError naming the bad key
    return {v: dict(o or {}) for v, o in variants.items()}, list(seeds)
