"""``part_sources``: other sources of part maps to pretrain SemMAE with, beside the pipeline's own.

Each entry of ``part_sources.sources`` names a source and gives its overrides of the ``parts`` section
(``kmeans: {method: kmeans}``, ``channel_grouping: {tokens: channel_grouping}``, ``{}`` = the ``parts``
section as it is). Per source, ``parts_source@<name>`` builds its part maps and exports them, and
``pretrain_source@<name>-<seed>`` pretrains the ``part_sources.variant`` run on them for every seed of
``pretrain.seeds``: those runs differ from ``pretrain@<variant>-<seed>`` only in where the parts come
from, so the report pairs them by seed with the MAE baseline and with the pipeline's own parts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from pipeline.config.base import ConfigError, format_error, read_params, read_section
from pipeline.config.parts import PartsConfig

__all__ = ["PartSources", "load_part_sources", "load_part_source", "SOURCE_NAME"]

SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # a path component and a DVC stage key (no '-': <name>-<seed>)
KEYS = ("variant", "sources")


@dataclass(frozen=True)
class PartSources:
    """The validated section: ``variant`` (a pretrain variant with semantic masking), ``sources`` (name ->
    overrides of ``parts``) and ``configs`` (name -> its full, validated :class:`PartsConfig`)."""

    variant: str
    sources: dict[str, dict]
    configs: dict[str, PartsConfig]


def _section(path: Path) -> dict:
    if "part_sources" not in read_params(path):  # an older parameter file: no sources, nothing to warn about
        return {}
    return read_section(path, "part_sources")


def load_part_sources(params_path: str | Path) -> PartSources:
    """Read and check ``part_sources``: known keys, source names, each source's overrides against the ``parts``
    section (errors name ``part_sources.sources.<name>.<key>`` or ``parts.<key>``), and that ``variant`` is a
    pretrain variant that masks with the part maps (``masking: semantic``) when there is any source."""
    from pipeline.config.pretrain import load_pretrain_config  # the pretrain section's own loader and messages

    path = Path(params_path)
    section = _section(path)
    unknown = sorted(str(k) for k in section if k not in KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key 'part_sources.{unknown[0]}'; allowed keys: {', '.join(KEYS)}")
    variant = section.get("variant", "semantic")
    if not isinstance(variant, str):
        raise ConfigError(f"{path}: 'part_sources.variant' = {variant!r} must be the name of a pretrain variant")
    sources = section.get("sources") or {}
    if not isinstance(sources, dict):
        raise ConfigError(f"{path}: 'part_sources.sources' must be a mapping of source name -> overrides of the "
                          f"parts section (e.g. kmeans: {{method: kmeans}}), got {sources!r}")  # fmt: skip
    parts = read_section(path, "parts") if sources else {}
    configs, problems = {}, []
    for name, over in sources.items():
        if not isinstance(name, str) or not SOURCE_NAME.match(name):
            raise ConfigError(f"{path}: source name 'part_sources.sources.{name}' must match [a-z][a-z0-9_]*")
        over = {} if over is None else over
        if not isinstance(over, dict):
            raise ConfigError(f"{path}: 'part_sources.sources.{name}' must be a mapping of overrides of the parts "
                              f"section (e.g. {{method: kmeans}}; {{}} = the parts section as it is), got {over!r}")  # fmt: skip
        try:
            configs[name] = PartsConfig.model_validate({**parts, **over})
        except ValidationError as exc:
            for err in exc.errors():
                key = str(err["loc"][0]) if err["loc"] else ""
                where = f"part_sources.sources.{name}" if key in over or not key else "parts"
                problems.append(format_error(path, where, PartsConfig, err))
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    if sources:
        cfg = load_pretrain_config(path, variant, 0)  # names the variants there are when it is missing
        if cfg.masking != "semantic":
            raise ConfigError(f"{path}: 'part_sources.variant' = {variant!r} masks with '{cfg.masking}', which does not "
                              "read the part maps: name a pretrain variant with masking: semantic")  # fmt: skip
    return PartSources(variant, {n: dict(o or {}) for n, o in sources.items()}, configs)


def load_part_source(params_path: str | Path, name: str) -> PartsConfig:
    """The ``parts`` config of source ``name``: the ``parts`` section with ``part_sources.sources.<name>`` on top."""
    sources = load_part_sources(params_path)
    if name not in sources.configs:
        raise ConfigError(f"{params_path}: no source 'part_sources.sources.{name}' (has {sorted(sources.configs)})")
    return sources.configs[name]
