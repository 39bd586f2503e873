"""Typed, validated stage configurations loaded from sections of ``params.yaml``.

Every stage reads exactly one section. Validation happens at load time, before any compute and
before any output is touched: an unknown key, a value of the wrong type or an out-of-range value
raises :class:`ConfigError` with a message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import PipelineError

__all__ = ["ConfigError", "StageConfig", "load_stage_config", "resolved_config", "ordered_pair", "format_error",
           "read_params", "read_section", "SECTIONS"]

# The top-level sections of a parameter file: one per stage config (``finetune`` also serves finetune_scratch,
# ``linprobe`` linprobe_reference; ``part_sources`` names the part sources pretrained beside the pipeline's own
# parts); dvc.yaml's ${...} and params: entries only name keys inside them.
SECTIONS = ("prepare", "teacher", "extract", "parts", "export_parts", "pretrain", "linprobe", "finetune", "part_sources")

log = logging.getLogger("semmae.config")


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


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of the YAML file gives one key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML would keep the last value
    silently, while DVC (ruamel.yaml) refuses the file, so the two would read different parameters."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:  # before merge keys (<<) are flattened in: overriding a merged key is fine
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class names it
                continue
            if first is not None:
                raise DuplicateKeyError(f"key {key!r} is given twice in one mapping, at lines {first} and {line}: "
                                        "DVC refuses such a file (PyYAML would keep the last); keep one")  # fmt: skip
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_params(path: Path) -> dict:
    """The whole parameter file: a mapping of known stage sections (:data:`SECTIONS`), no key given twice."""
    if not path.is_file():
        raise ConfigError(f"parameter file {path} not found: run from the repository root or pass --params")
    try:
        params = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections at the top level")
    unknown = sorted(str(k) for k in params if k not in SECTIONS)
    if unknown:  # a misspelt section would otherwise leave its stage on the defaults without a word
        raise ConfigError(f"{path}: unknown section '{unknown[0]}' at the top level; the sections are: {', '.join(SECTIONS)}")
    return params


def read_section(path: Path, section: str) -> dict:
    params = read_params(path)
    if section not in params:  # allowed (tests and small files rely on it), but said: it may be a forgotten section
        log.warning("%s: no '%s' section: every %s key takes its default", path, section, section)
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
