"""The finished teacher as downstream stages read it: its ViT shape and the frozen backbone the ``teacher``
stage wrote. Kept apart from ``build.py`` so extract, train_parts and export_parts do not depend on (and
are not rerun for) the teacher's training code."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config.teacher import TeacherConfig
from pipeline.io import file_sha256
from pipeline.models.checkpoint import CheckpointError, build_vit, load_backbone

__all__ = ["CHECKPOINT_NAME", "teacher_vit", "load_teacher"]

CHECKPOINT_NAME = "checkpoint_teacher.pth"


def teacher_vit(cfg: TeacherConfig):
    """A randomly initialised ViT of the configured shape."""
    return build_vit(cfg.arch, cfg.img_size, cfg.patch_size, cfg.depth, cfg.num_heads, cfg.embed_dim)


def load_teacher(teacher_dir: str | Path):
    """The frozen teacher written by the ``teacher`` stage: ``(vit, its TeacherConfig, checkpoint sha256)``."""
    teacher_dir = Path(teacher_dir)
    cfg_path, ckpt = teacher_dir / "config.json", teacher_dir / CHECKPOINT_NAME
    if not cfg_path.is_file() or not ckpt.is_file():
        raise CheckpointError(f"{teacher_dir} holds no {CHECKPOINT_NAME} + config.json: run the teacher stage first")
    try:
        cfg = TeacherConfig.model_validate(json.loads(cfg_path.read_text())["teacher"])
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, no 'teacher' section, invalid values
        raise CheckpointError(f"{cfg_path} is not a teacher config ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): "
                              f"restore it (dvc checkout {teacher_dir}) or rerun the teacher stage (dvc repro teacher)") from None
    vit = load_backbone(teacher_vit(cfg), ckpt)
    for p in vit.parameters():
        p.requires_grad_(False)
    return vit.eval(), cfg, file_sha256(ckpt)
