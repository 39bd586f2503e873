"""DVC stage ``teacher``: an official iBOT checkpoint, or one trained here, saved in the official format."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

import typer

from pipeline.config.base import load_stage_config
from pipeline.config.teacher import TeacherConfig
from pipeline.io import atomic_write_json

log = logging.getLogger("semmae.teacher")


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its 'teacher' section is read."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Shard set written by `semmae prepare`."),
    out: Path = typer.Option(Path("data/teacher"), help="Output directory: checkpoint_teacher.pth + config.json."),
    metrics: Path = typer.Option(Path("metrics/teacher.json"), help="k-NN quality of teacher, random ViT, raw pixels."),
    curves: Path = typer.Option(Path("metrics/teacher_train.tsv"), help="Per-epoch training curves (TSV)."),
    resume: Path = typer.Option(Path("data/resume/teacher"), help="Resume checkpoints of teacher.init=train (kept "
                                "while a killed run is rerun; not a DVC output)."),
    max_steps: int = typer.Option(None, help="Stop training after this many steps (smoke tests)."),
) -> None:
    """Load (teacher.init=checkpoint) or train with the iBOT objective (teacher.init=train) the frozen ViT.

    Both paths save OUT/checkpoint_teacher.pth in iBOT's official backbone format and report the
    k-NN accuracy (cosine, CLS after the final norm, val against train) of the teacher, of a random
    ViT of the same shape and of raw pixels.
    """
    from pipeline.curves import CurveLog
    from pipeline.resume import exclusive_run
    from pipeline.teacher.build import build_teacher

    cfg = load_stage_config(TeacherConfig, params, "teacher")
    log.info("teacher: init=%s arch=%s img_size=%d patch=%s", cfg.init, cfg.arch, cfg.img_size, cfg.patch_size)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 writes
    with exclusive_run(resume, "teacher") if main else nullcontext():  # creates it: a DVC output even when untrained
        curve_log = CurveLog(curves, staged=True) if main else None  # replaces `curves` only at success
        result = build_teacher(cfg, prepared, out, log_step=curve_log, max_steps=max_steps, resume_dir=resume,
                               curve_rows=curve_log.rows if curve_log else None)  # fmt: skip
        if result:
            atomic_write_json(metrics, result)
            curve_log.publish()
