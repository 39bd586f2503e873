"""Config of the ``finetune`` stages (section ``finetune``): MAE's end-to-end fine-tuning protocol.

The field defaults are MAE's ViT-B/16 ImageNet recipe (MAE paper, appendix A.2; ``main_finetune.py``);
``params.yaml`` shrinks the schedule for the embedded default.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from pipeline.config.base import StageConfig, ordered_pair

__all__ = ["FinetuneConfig"]


class FinetuneConfig(StageConfig):
    """``finetune``: the whole encoder and a new head (average-pooled patch tokens -> LayerNorm -> Linear),
    AdamW with layer-wise lr decay, drop path, mixup/cutmix, RandAugment, random erasing, label smoothing."""

    epochs: int = Field(100, gt=0)
    warmup_epochs: float = Field(5.0, ge=0)
    batch_size: int = Field(1024, gt=0, description="Global batch: over all ranks and accumulation steps.")
    accum_steps: int = Field(1, gt=0, description="Gradient accumulation: micro-batch = batch_size / (ranks * accum_steps).")
    steps_per_epoch: Optional[int] = Field(None, gt=0, description="Optimiser steps per epoch; null = train images // batch_size.")
    base_lr: float = Field(5e-4, gt=0, description="Peak lr = base_lr * batch_size / 256. Choose it on the hold-out "
                           "(metric holdout_top1), never on the reported top1.")  # fmt: skip
    min_lr: float = Field(1e-6, ge=0, description="End of the per-iteration half-cycle cosine.")
    weight_decay: float = Field(0.05, ge=0, description="None on biases, norms, tokens and position embeddings.")
    betas: list[float] = Field([0.9, 0.999], min_length=2, max_length=2)
    layer_decay: float = Field(0.65, gt=0, le=1, description="Layer-wise lr decay: block i of L gets "
                               "layer_decay^(L - i) of the lr, the head 1 (timm's param_groups_layer_decay).")  # fmt: skip
    drop_path: float = Field(0.1, ge=0, lt=1, description="Stochastic depth rate of the last block (timm drop_path_rate).")
    clip_grad: Optional[float] = Field(None, gt=0)
    # regularisation and augmentation (timm: Mixup, SoftTargetCrossEntropy, create_transform)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.8, ge=0, description="Mixup alpha; 0 = off.")
    cutmix: float = Field(1.0, ge=0, description="CutMix alpha; 0 = off.")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="Probability of mixing a batch at all.")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="Probability of CutMix instead of Mixup when both are on.")
    auto_augment: Optional[str] = Field(
        "rand-m9-mstd0.5-inc1", min_length=1, description="timm auto-augment policy string (RandAugment m9, mstd 0.5); "
        "null = none."
    )  # fmt: skip
    random_erasing: float = Field(0.25, ge=0, le=1, description="Probability of random erasing (timm re_prob, mode pixel).")
    crop_scale: list[float] = Field([0.08, 1.0], min_length=2, max_length=2, description="RandomResizedCrop area range.")
    hflip: float = Field(0.5, ge=0, le=1)
    eval_crop_pct: float = Field(0.875, gt=0, le=1, description="Evaluation: resize the shorter side to img_size / "
                                 "eval_crop_pct (bicubic), centre-crop img_size (ImageNet: 256 -> 224).")  # fmt: skip
    # runtime
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes per rank.")
    shuffle_buffer: int = Field(1000, ge=1, description="Samples in each rank's shuffle buffer.")
    eval_every: int = Field(1, ge=0, description="Epochs between hold-out evaluations (curves); 0 = only at the end.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    checkpoint_every: int = Field(1, gt=0, description="Epochs between resume checkpoints (the last epoch always).")
    seed: int = Field(0, ge=0, description="Mixed with the run's pretrain seed: head init, data order, augmentation.")

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        ordered_pair(self.crop_scale, "crop_scale")
        if not (0 < self.crop_scale[0] and self.crop_scale[1] <= 1):
            raise ValueError(f"crop_scale={self.crop_scale} must lie in (0, 1]")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={self.betas} must lie in [0, 1)")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of accum_steps={self.accum_steps}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}")
        return self

    @property
    def mixing(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def peak_lr(self) -> float:
        return self.base_lr * self.batch_size / 256
