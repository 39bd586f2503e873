"""Config of the ``linprobe`` stages (section ``linprobe``): MAE's linear-probing protocol."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import StageConfig, ordered_pair

__all__ = ["LinprobeConfig"]


class LinprobeConfig(StageConfig):
    """``linprobe``: a BatchNorm + linear head on the frozen encoder's CLS token, trained with LARS."""

    mode: Literal["cached", "online"] = Field(
        "cached", description="cached: encode every image once, train the head on the stored features; "
        "online: stream the training images from the shards and encode each batch (needed for augmentation)."
    )  # fmt: skip
    augment: bool = Field(
        False, description="online only: RandomResizedCrop (bicubic) + horizontal flip of the training images "
        "(timm's transform, on the whole decoded image); off: the evaluation crop."
    )  # fmt: skip
    crop_scale: list[float] = Field([0.08, 1.0], min_length=2, max_length=2, description="augment: crop area range.")
    epochs: int = Field(90, gt=0)
    warmup_epochs: float = Field(10, ge=0)
    batch_size: int = Field(256, gt=0, description="Head training batch (global).")
    base_lr: list[float] = Field(
        [0.1, 1.0, 10.0, 100.0], min_length=1, description="Peak lr = base_lr * batch_size / 256 (MAE: 0.1 with ImageNet's 7k "
        "steps); a list trains one head per value on the same batches and keeps the best on the holdout split."
    )  # fmt: skip
    eval_crop_pct: float = Field(
        1.0, gt=0, le=1, description="Probe images (cached features, evaluation) are resized to a shorter side of "
        "img_size / eval_crop_pct (bicubic), then centre-cropped to img_size (MAE on ImageNet: 0.875)."
    )  # fmt: skip
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    trust_coefficient: float = Field(0.001, gt=0)
    knn_k: int = Field(20, gt=0, description="k of the k-NN accuracy (cosine, weighted, on the same features).")
    eval_batch_size: int = Field(256, gt=0, description="Images per encoder forward pass.")
    seed: int = Field(0, ge=0, description="Head initialisation and batch order.")
    num_workers: int = Field(0, ge=0, description="online: image loader worker processes per rank (0: in the rank).")
    shuffle_buffer: int = Field(1000, gt=0, description="online: images each loader stream shuffles in (per stream).")
    pixel_size: Optional[int] = Field(
        None, gt=0, description="Side the raw-pixels reference is area-resized to before flattening; null = the "
        "encoder's img_size (ImageNet: 16 keeps it at 768 numbers per image)."
    )  # fmt: skip

    @field_validator("base_lr", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        # a single number is a one-candidate grid
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("base_lr")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(not (v > 0) for v in value):
            raise ValueError("every candidate must be > 0")
        return value

    @model_validator(mode="after")
    def _check(self) -> "LinprobeConfig":
        ordered_pair(self.crop_scale, "crop_scale")
        if not (0 < self.crop_scale[0] and self.crop_scale[1] <= 1):
            raise ValueError(f"crop_scale={self.crop_scale} must lie in (0, 1]")
        if self.augment and self.mode != "online":
            raise ValueError("augment=true needs mode=online (cached features are computed once, without augmentation)")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}")
        return self

    def base_lrs(self) -> list[float]:
        """The distinct candidate base lrs in ascending order."""
        return sorted(set(self.base_lr))

    def peak_lr(self, base_lr: Optional[float] = None) -> float:
        """Peak lr of ``base_lr`` (default: the only candidate; a grid needs the value)."""
        if base_lr is None:
            lrs = self.base_lrs()
            if len(lrs) != 1:
                raise ValueError(f"base_lr={self.base_lr} is a grid: pass the candidate to peak_lr()")
            base_lr = lrs[0]
        return base_lr * self.batch_size / 256
