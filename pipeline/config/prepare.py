"""Config of the ``prepare`` stage."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator

from pipeline.config.base import StageConfig

__all__ = ["PrepareConfig"]

SYNTHETIC_MIN_SIZE = 32  # pipeline.data.synthetic_parts.MIN_SIZE (configs import no data code; a test pins the two)


class PrepareConfig(StageConfig):
    """``prepare``: labelled images -> deterministic WebDataset shards (``train``, ``holdout`` and ``val``)."""

    source: Literal["fashion_mnist", "imagefolder", "synthetic_parts"] = Field(
        "fashion_mnist",
        description="Where the images come from; synthetic_parts: generated images (6 classes) whose shards also "
        "hold each image's ground-truth part mask (truth.png), so part maps can be scored.",
    )
    root: str = Field(
        "/usr/share/datasets/fashion-mnist",
        min_length=1,
        description="fashion_mnist: directory of the four idx .gz files; "
        "imagefolder: dataset directory holding train_dir (and val_dir); synthetic_parts: ignored.",
    )
    train_dir: str = Field(
        "train", description="imagefolder: class-folder tree for training, relative to root ('.' = root)."
    )
    val_dir: Optional[str] = Field(
        None,
        description="imagefolder: class-folder tree for validation, relative to root; "
        "null = hold out val_fraction of each class of train_dir (seeded).",
    )
    synthetic_size: int = Field(
        SYNTHETIC_MIN_SIZE, ge=SYNTHETIC_MIN_SIZE, le=512,
        description="synthetic_parts: pixels per side of the generated images (and their part masks).",
    )  # fmt: skip
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="imagefolder without val_dir: held-out share.")
    train_limit: Optional[int] = Field(
        5000, gt=0, description="Class-balanced, seeded subset size of train; null = every image (not with "
        "synthetic_parts: the number to generate)."
    )
    val_limit: Optional[int] = Field(
        1000, gt=0, description="Class-balanced, seeded subset size of val; null = every image (not with "
        "synthetic_parts: the number to generate)."
    )
    holdout_size: int = Field(
        1000, gt=0, description="Class-balanced, seeded images carved out of the training source before train_limit "
        "(split 'holdout', never in train): model selection (the linear probe's lr) is done on it, not on val."
    )  # fmt: skip
    shard_size: int = Field(1000, gt=0, le=1_000_000, description="Samples per .tar shard.")
    resize: Optional[int] = Field(
        None, gt=0, le=8192, description="Shrink so the shorter side has this many pixels (bicubic; smaller images and "
        "their JPEG bytes are kept as they are); null = keep every image."
    )
    jpeg_quality: int = Field(95, ge=1, le=100, description="Quality of re-encoded JPEGs (only after a resize).")
    seed: int = Field(0, ge=0, description="Seed of the subsets, the held-out split and the sample order.")
    on_corrupt: Literal["fail", "skip"] = Field(
        "fail", description="An unreadable image: fail naming the file, or skip it and count it in the metrics."
    )
    max_skip_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="With on_corrupt=skip: fail when more than this share is skipped."
    )
    num_workers: Optional[int] = Field(
        None, ge=0, le=256, description="Encoder processes; null = all cores, 0 = in-process. Output is identical."
    )

    @model_validator(mode="after")
    def _check_dirs(self) -> "PrepareConfig":
        for key in ("train_dir", "val_dir"):
            value = getattr(self, key)
            if value is not None and (Path(value).is_absolute() or ".." in Path(value).parts):
                raise ValueError(f"{key}={value!r} must be a path relative to root without '..'")
        return self

    @model_validator(mode="after")
    def _check_synthetic_limits(self) -> "PrepareConfig":
        if self.source == "synthetic_parts":
            for key in ("train_limit", "val_limit"):
                if getattr(self, key) is None:
                    raise ValueError(f"{key}=null (every image) has no meaning for source synthetic_parts, a generator "
                                     f"without end: set prepare.{key} to the number of images to generate")  # fmt: skip
        return self
