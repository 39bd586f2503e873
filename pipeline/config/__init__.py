"""Typed, validated stage configurations loaded from sections of ``params.yaml``.

One module per stage (``prepare``, ``teacher``, ``extract``, ``parts``, ``pretrain``, ``linprobe``) on a
shared ``base``; each DVC stage depends only on the modules it imports, so adding or changing one stage's
config does not rerun the others. The names below are re-exported lazily for convenience (``from
pipeline.config import PrepareConfig``): importing one stage's module never loads the others.
"""

from importlib import import_module

_EXPORTS = {
    "ConfigError": "base", "StageConfig": "base", "load_stage_config": "base", "resolved_config": "base",
    "ExtractConfig": "extract", "LinprobeConfig": "linprobe", "ExportPartsConfig": "parts", "PartsConfig": "parts",
    "PrepareConfig": "prepare", "PretrainConfig": "pretrain", "load_pretrain_config": "pretrain",
    "TeacherConfig": "teacher", "TeacherTrainConfig": "teacher",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"pipeline.config.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pipeline.config' has no attribute {name!r}")
