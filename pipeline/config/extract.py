"""Config of the ``extract`` stage."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from pipeline.config.base import StageConfig

__all__ = ["ExtractConfig"]


class ExtractConfig(StageConfig):
    """``extract``: the frozen teacher's CLS and patch tokens for prepared images, as Arrow files."""

    splits: list[Literal["train", "val"]] = Field(["train", "val"], min_length=1, description="Splits to extract.")
    limit: Optional[int] = Field(
        None, gt=0, description="Seeded subset of at most this many images per split; null = every image."
    )
    batch_size: int = Field(256, gt=0, description="Images per forward pass (per process).")
    seed: int = Field(0, ge=0, description="Seed of the limit subset.")
