"""Typed, validated stage configurations loaded from sections of ``params.yaml``.

One module per stage (``prepare``, ``teacher``, ``extract``, ``parts``, ``pretrain``) on a shared
``base``; each DVC stage depends only on ``base.py`` and its own module, so adding or changing one
stage's config does not rerun the others. Everything is re-exported here for convenience.
"""

from pipeline.config.base import (
    ConfigError,
    StageConfig,
    load_stage_config,
    resolved_config,
)
from pipeline.config.extract import ExtractConfig
from pipeline.config.linprobe import LinprobeConfig
from pipeline.config.parts import ExportPartsConfig, PartsConfig
from pipeline.config.prepare import PrepareConfig
from pipeline.config.pretrain import PretrainConfig, load_pretrain_config
from pipeline.config.teacher import TeacherConfig, TeacherTrainConfig

__all__ = [
    "ConfigError", "StageConfig", "PrepareConfig", "TeacherConfig", "TeacherTrainConfig", "ExtractConfig", "PartsConfig",
    "ExportPartsConfig", "PretrainConfig", "LinprobeConfig", "load_stage_config", "load_pretrain_config", "resolved_config",
]
