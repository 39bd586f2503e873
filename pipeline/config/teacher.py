"""Config of the ``teacher`` stage (and the iBOT training recipe under ``teacher.train``)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from pipeline.config.base import StageConfig, ordered_pair

__all__ = ["TeacherTrainConfig", "TeacherConfig"]


class TeacherTrainConfig(StageConfig):
    """``teacher.train``: the iBOT objective, used when ``teacher.init`` is ``train``."""

    epochs: int = Field(50, gt=0, description="Passes over the prepared train split.")
    batch_size: int = Field(64, gt=0, description="Images per step (global, over all ranks).")
    base_lr: float = Field(1e-3, gt=0, description="AdamW peak lr = base_lr * batch_size / 256.")
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(5, ge=0)
    weight_decay: float = Field(0.04, ge=0, description="Cosine-scheduled from this ...")
    weight_decay_end: float = Field(0.4, ge=0, description="... to this (no decay on biases, norms, tokens).")
    momentum_teacher: float = Field(0.99, ge=0, le=1, description="EMA momentum, cosine-scheduled to 1.")
    teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0, description="Teacher temperature at step 0 ...")
    warmup_teacher_temp_epochs: float = Field(0, ge=0, description="... linearly warmed to teacher_temp.")
    student_temp: float = Field(0.1, gt=0)
    center_momentum: float = Field(0.9, ge=0, lt=1)
    out_dim: int = Field(256, gt=1, description="Prototypes of the projection head.")
    head_hidden_dim: int = Field(512, gt=0)
    head_bottleneck_dim: int = Field(128, gt=0)
    n_local_crops: int = Field(2, ge=0)
    local_size: int = Field(16, gt=0, description="Side of local crops in pixels (a multiple of the patch size).")
    global_scale: list[float] = Field([0.4, 1.0], min_length=2, max_length=2)
    local_scale: list[float] = Field([0.05, 0.4], min_length=2, max_length=2)
    mask_ratio: list[float] = Field([0.1, 0.5], min_length=2, max_length=2, description="Share of block-masked patches.")
    patch_loss_weight: float = Field(1.0, ge=0)
    jitter: float = Field(0.4, ge=0, le=1, description="Brightness/contrast jitter strength.")
    clip_grad: Optional[float] = Field(3.0, gt=0)
    freeze_last_layer_epochs: float = Field(1, ge=0)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_pairs(self) -> "TeacherTrainConfig":
        for key in ("global_scale", "local_scale", "mask_ratio"):
            ordered_pair(getattr(self, key), key)
            if not 0 < getattr(self, key)[1] <= 1 or getattr(self, key)[0] < 0:
                raise ValueError(f"{key}={getattr(self, key)} must lie in (0, 1]")
        return self


class TeacherConfig(StageConfig):
    """``teacher``: the frozen iBOT ViT whose features the part learner reads."""

    init: Literal["checkpoint", "train"] = Field(
        "checkpoint", description="checkpoint: load an official-format iBOT file; train: train one here."
    )
    checkpoint: str = Field(
        "assets/teacher/checkpoint_teacher.pth",
        min_length=1,
        description="iBOT checkpoint_teacher.pth or checkpoint.pth (used when init=checkpoint).",
    )
    arch: str = Field("vit_tiny_patch16_224", min_length=1, description="timm ViT name.")
    img_size: int = Field(32, gt=0, description="Input resolution of the teacher.")
    patch_size: Optional[int] = Field(4, gt=0, description="Override of the arch's patch size; null = keep.")
    depth: Optional[int] = Field(4, gt=0, description="Override of the arch's depth; null = keep.")
    num_heads: Optional[int] = Field(4, gt=0, description="Override of the arch's heads; null = keep.")
    embed_dim: Optional[int] = Field(128, gt=0, description="Override of the arch's width; null = keep.")
    knn_k: int = Field(20, gt=0, description="k of the k-NN quality check (cosine, CLS after the final norm).")
    knn_limit: Optional[int] = Field(
        None, gt=0, description="k-NN quality check on a seeded subset of at most this many images per split; "
        "null = all (the split is streamed: only the features are held in memory)."
    )  # fmt: skip
    eval_batch_size: int = Field(256, gt=0)
    save_dtype: Literal["float16", "float32"] = "float16"
    train: TeacherTrainConfig = TeacherTrainConfig()

    @model_validator(mode="after")
    def _check_grid(self) -> "TeacherConfig":
        if self.patch_size is not None and self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.patch_size is not None and self.train.local_size % self.patch_size:
            raise ValueError(f"train.local_size={self.train.local_size} is not a multiple of patch_size={self.patch_size}")
        return self
