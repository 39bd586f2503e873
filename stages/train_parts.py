"""DVC stage ``train_parts``: SemMAE's semantic part learner on the teacher's features, with references."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from pipeline.config.base import load_stage_config
from pipeline.config.parts import PartsConfig
from pipeline.io import atomic_write_json

log = logging.getLogger("semmae.train_parts")


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its 'parts' section is read."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Shard set (reconstruction targets)."),
    teacher: Path = typer.Option(Path("data/teacher"), help="Teacher directory (attention-heads reference)."),
    features: Path = typer.Option(Path("data/features"), help="Feature set written by `semmae extract`."),
    out: Path = typer.Option(Path("data/parts"), help="Output: part_learner.pth + config.json."),
    metrics: Path = typer.Option(Path("metrics/parts.json"), help="Part statistics of the method and the references."),
    curves: Path = typer.Option(Path("metrics/parts_train.tsv"), help="Per-epoch training curves (TSV)."),
    figure: Path = typer.Option(Path("plots/parts/val_parts.png"), help="Validation images with part maps overlaid."),
    resume: Path = typer.Option(Path("data/resume/train_parts"), help="Resume checkpoints (kept while a killed run "
                                "is rerun; not a DVC output)."),
) -> None:
    """Train the part learner (parts.method=learned) or take attention heads, and report part statistics.

    Statistics on validation argmax maps: per-part share (min/max), spatial coherence next to
    position-shuffled maps, for the method and its references (attention heads, k-means on patch
    tokens, the learner on a random teacher, the learner with the other form of part tokens). On a
    prepared set with ground-truth part masks (prepare.source: synthetic_parts), also the part IoU of
    each, and of the patch-grid oracle.
    """
    import torch

    from pipeline.curves import CurveLog
    from pipeline.parts.build import build_parts
    from pipeline.resume import exclusive_run

    cfg = load_stage_config(PartsConfig, params, "parts")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with exclusive_run(resume, "train_parts"):  # creates it: a DVC output even when nothing is trained
        curve_log = CurveLog(curves, staged=True)  # replaces `curves` only at success
        result = build_parts(cfg, prepared, teacher, features, out, figure, device, curve_log, resume_dir=resume,
                             curve_rows=curve_log.rows)  # fmt: skip
        atomic_write_json(metrics, result)
        curve_log.publish()
    log.info("parts %s; references: attention heads %s, k-means %s", result.get("parts"),
             result.get("attention_heads"), result.get("kmeans"))  # fmt: skip
