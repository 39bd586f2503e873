"""Configs of the ``train_parts`` (section ``parts``) and ``export_parts`` stages."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from pipeline.config.base import StageConfig

__all__ = ["PartsConfig", "ExportPartsConfig"]


class PartsConfig(StageConfig):
    """``parts``: the semantic part learner (``train_parts``) and the part maps (``export_parts``)."""

    method: Literal["learned", "attention_heads", "kmeans", "random_teacher", "ground_truth"] = Field(
        "learned", description="learned: SemMAE's part learner; attention_heads: argmax over the teacher's "
        "last-layer CLS-to-patch attention heads (no training; N = number of heads); kmeans: cosine k-means "
        "(N clusters) of the teacher's patch tokens; random_teacher: the part learner on a randomly "
        "initialised teacher of the same shape. The last three are the ablations of the learned parts. "
        "ground_truth: each patch's majority true part (N = the part names + background), only on prepared "
        "sets with true part masks (prepare.source: synthetic_parts): the control with parts known to be right."
    )  # fmt: skip
    tokens: Literal["mlp", "channel_grouping"] = Field(
        "mlp", description="Form of the part learner's part tokens (learned, random_teacher). mlp: "
        "P = reshape(MLP(c), N x C) + Q (this implementation's); channel_grouping: P_i = d_i(c) * c, the CLS "
        "token re-weighted by part i's channel grouping d_i(c) = sigmoid(W2 tanh(W1 c))_i (the paper's idea). "
        "train_parts also trains the other form on the same data and reports it beside the method."
    )  # fmt: skip
    num_parts: int = Field(6, ge=2, le=64, description="N, the number of parts.")
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0, description="AdamW lr (cosine decay, no warm-up).")
    weight_decay: float = Field(0.0, ge=0)
    decoder_channels: int = Field(32, gt=0)
    style_dim: int = Field(32, gt=0)
    temperature: float = Field(
        0.1, gt=0, description="Softmax temperature of the part maps: S = P F^T / (sqrt(C) * temperature)."
    )
    blur_size: int = Field(3, ge=1, description="Side of the fixed Gaussian blur on the part maps (odd).")
    blur_sigma: float = Field(1.0, gt=0)
    diversity_weight: float = Field(1.0, ge=0, description="Weight of the overlap penalty between part maps.")
    usage_weight: float = Field(1.0, ge=0, description="Weight of the penalty on parts below min_share.")
    min_share: float = Field(0.05, ge=0, lt=1, description="Batch-mean share under which a part is penalised.")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "PartsConfig":
        if self.blur_size % 2 == 0:
            raise ValueError(f"blur_size={self.blur_size} must be odd")
        if self.min_share * self.num_parts >= 1:
            raise ValueError(f"min_share={self.min_share} x num_parts={self.num_parts} must stay below 1")
        return self


class ExportPartsConfig(StageConfig):
    """``export_parts``: argmax part maps of every prepared image, in shards beside the images."""

    grid: Optional[int] = Field(
        8, gt=0, description="Side of the MAE patch grid the maps are stored on (image size / MAE patch size); "
        "null = the teacher's grid. Soft maps are resized before the argmax when it differs."
    )  # fmt: skip
    batch_size: int = Field(256, gt=0, description="Images per teacher forward pass (per process).")
