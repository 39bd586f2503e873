"""Typed, validated stage configurations loaded from sections of ``params.yaml``.

Every stage reads exactly one section. Validation happens at load time, before any compute and
before any output is touched: an unknown key, a value of the wrong type or an out-of-range value
raises :class:`ConfigError` with a message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import PipelineError

__all__ = ["ConfigError", "StageConfig", "load_stage_config", "resolved_config", "ordered_pair", "format_error", "read_section"]


class ConfigError(PipelineError, ValueError):
    """A parameter file or one of its values is invalid; the message says which and why."""


class StageConfig(BaseModel):
    """Base of every stage config: strict types, no unknown keys, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


C = TypeVar("C", bound=StageConfig)


def format_error(path: Path, section: str, model: type[StageConfig], err: dict[str, Any]) -> str:
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


def read_section(path: Path, section: str) -> dict:
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
    return data


def load_stage_config(model: type[C], params_path: str | Path, section: str) -> C:
    """Read ``section`` of the YAML file ``params_path`` into ``model``, or raise :class:`ConfigError`."""
    path = Path(params_path)
    data = read_section(path, section)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [format_error(path, section, model, e) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def resolved_config(cfg: StageConfig, section: str) -> bytes:
    """The fully resolved config (defaults filled in) as deterministic JSON, to store beside outputs."""
    return (json.dumps({section: cfg.model_dump(mode="json")}, indent=2, sort_keys=True) + "\n").encode()


def ordered_pair(value: list[float], key: str) -> None:
    if not value[0] <= value[1]:
        raise ValueError(f"{key}={value} must be [low, high] with low <= high")
