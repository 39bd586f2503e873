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

__all__ = ["ConfigError", "StageConfig", "PrepareConfig", "load_stage_config", "resolved_config"]


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
        allowed = ", ".join(sorted(model.model_fields))
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
