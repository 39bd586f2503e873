"""Typed, validated stage configurations loaded from sections of ``params.yaml``.

Every stage reads exactly one section. Validation happens at load time, before any compute and
before any output is touched: an unknown key, a value of the wrong type or an out-of-range value
raises :class:`ConfigError` with a message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import PipelineError

__all__ = [
    "ConfigError", "StageConfig", "PrepareConfig", "TeacherConfig", "TeacherTrainConfig", "ExtractConfig", "PartsConfig", "ExportPartsConfig",
    "load_stage_config", "resolved_config",
]


class ConfigError(PipelineError, ValueError):
    """A parameter file or one of its values is invalid; the message says which and why."""


class StageConfig(BaseModel):
    """Base of every stage config: strict types, no unknown keys, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PrepareConfig(StageConfig):
    """``prepare``: labelled images -> deterministic WebDataset shards (``train`` and ``val``)."""

    source: Literal["fashion_mnist", "imagefolder"] = Field(
        "fashion_mnist", description="Where the images come from."
    )
    root: str = Field(
        "/usr/share/datasets/fashion-mnist",
        min_length=1,
        description="fashion_mnist: directory of the four idx .gz files; "
        "imagefolder: dataset directory holding train_dir (and val_dir).",
    )
    train_dir: str = Field(
        "train", description="imagefolder: class-folder tree for training, relative to root ('.' = root)."
    )
    val_dir: Optional[str] = Field(
        None,
        description="imagefolder: class-folder tree for validation, relative to root; "
        "null = hold out val_fraction of each class of train_dir (seeded).",
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="imagefolder without val_dir: held-out share.")
    train_limit: Optional[int] = Field(
        5000, gt=0, description="Class-balanced, seeded subset size of train; null = every image."
    )
    val_limit: Optional[int] = Field(
        1000, gt=0, description="Class-balanced, seeded subset size of val; null = every image."
    )
    shard_size: int = Field(1000, gt=0, le=1_000_000, description="Samples per .tar shard.")
    resize: Optional[int] = Field(
        None, gt=0, le=8192, description="Resize so the shorter side has this many pixels (bicubic); null = keep."
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


C = TypeVar("C", bound=StageConfig)


def _format_error(path: Path, section: str, model: type[StageConfig], err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in (section, *err["loc"]))
    if err["type"] == "extra_forbidden":
        owner = model  # the (nested) config the unknown key was found in
        for part in err["loc"][:-1]:
            field = owner.model_fields.get(str(part))
            if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, StageConfig)):
                break
            owner = field.annotation
        allowed = ", ".join(sorted(owner.model_fields))
        return f"{path}: unknown key '{loc}' (value {err['input']!r}); allowed keys: {allowed}"
    if err["type"] == "missing":
        return f"{path}: missing key '{loc}'"
    msg = err["msg"].removeprefix("Value error, ")
    if err["loc"]:
        return f"{path}: '{loc}' = {err['input']!r} is invalid: {msg}"
    return f"{path}: section '{section}' is invalid: {msg}"


def load_stage_config(model: type[C], params_path: str | Path, section: str) -> C:
    """Read ``section`` of the YAML file ``params_path`` into ``model``, or raise :class:`ConfigError`."""
    path = Path(params_path)
    if not path.is_file():
        raise ConfigError(f"parameter file {path} not found: run from the repository root or pass --params")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections at the top level")
    data = params.get(section, {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: section '{section}' must be a mapping of keys, got {data!r}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(path, section, model, e) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def resolved_config(cfg: StageConfig, section: str) -> bytes:
    """The fully resolved config (defaults filled in) as deterministic JSON, to store beside outputs."""
    return (json.dumps({section: cfg.model_dump(mode="json")}, indent=2, sort_keys=True) + "\n").encode()


def _ordered_pair(value: list[float], key: str) -> None:
    if not value[0] <= value[1]:
        raise ValueError(f"{key}={value} must be [low, high] with low <= high")


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
            _ordered_pair(getattr(self, key), key)
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


class ExtractConfig(StageConfig):
    """``extract``: the frozen teacher's CLS and patch tokens for prepared images, as Arrow files."""

    splits: list[Literal["train", "val"]] = Field(["train", "val"], min_length=1, description="Splits to extract.")
    limit: Optional[int] = Field(
        None, gt=0, description="Seeded subset of at most this many images per split; null = every image."
    )
    batch_size: int = Field(256, gt=0, description="Images per forward pass (per process).")
    seed: int = Field(0, ge=0, description="Seed of the limit subset.")


class PartsConfig(StageConfig):
    """``parts``: the semantic part learner (``train_parts``) and the part maps (``export_parts``)."""

    method: Literal["learned", "attention_heads"] = Field(
        "learned", description="learned: SemMAE's part learner; attention_heads: argmax over the teacher's "
        "last-layer CLS-to-patch attention heads (no training; N = number of heads)."
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
