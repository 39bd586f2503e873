"""DVC stages ``linprobe`` (one pretrained encoder) and ``linprobe_reference`` (raw pixels, random encoder)."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

import typer

from pipeline.config.base import load_stage_config
from pipeline.config.linprobe import LinprobeConfig
from pipeline.io import atomic_write_json

log = logging.getLogger("semmae.linprobe")


def _device():
    from pipeline.distributed import device_for_rank

    return device_for_rank()


def _main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its 'linprobe' section is read."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Labelled shard set written by `semmae prepare`."),
    pretrained: Path = typer.Option(..., help="A pretrain output directory (encoder.pth + meta.json)."),
    out: Path = typer.Option(..., help="Output directory: head.pth + config.json."),
    metrics: Path = typer.Option(..., help="val top-1, top-5, k-NN top-1 of the head chosen on holdout; the chosen "
                                 "base_lr and every candidate's holdout top-1 (JSON)."),
    curves: Path = typer.Option(..., help="Per-epoch loss, train accuracy and lr of the chosen head, and of every "
                                "candidate head (columns <name>_lr<base_lr>) (TSV)."),
    resume: Path = typer.Option(None, help="Resume checkpoints of the head training (kept while a killed run is rerun; not a DVC output)."),
) -> None:
    """MAE's linear probe (BatchNorm + linear head on the frozen CLS token, LARS) and k-NN of one encoder: one
    head per linprobe.base_lr candidate, chosen on the holdout split, reported on val."""
    from pipeline.curves import CurveLog
    from pipeline.eval.linprobe import chosen_curve
    from pipeline.eval.probe_run import probe_pretrained
    from pipeline.resume import exclusive_run

    cfg = load_stage_config(LinprobeConfig, params, "linprobe")
    # creates the resume directory: a DVC output even when nothing is left to resume
    with exclusive_run(resume, "linprobe") if resume is not None and _main() else nullcontext():
        curve_log = CurveLog(curves, staged=True) if _main() else None  # replaces `curves` only at success
        result = probe_pretrained(cfg, prepared, pretrained, out, _device(), curve_log, resume_dir=resume,
                                  curve_rows=curve_log.rows if curve_log else None)  # fmt: skip
        if result:  # rank 0 writes (under torchrun the other ranks share the encoding, and in online mode the training)
            atomic_write_json(metrics, result)
            rows = chosen_curve(curve_log.rows, result["base_lr"])  # loss, train_top1, lr: the chosen head's
            if rows:
                curve_log.rows[:] = rows
            curve_log.publish()
    log.info("done: %s", result)


def reference(
    params: Path = typer.Option(Path("params.yaml"), help="Its 'linprobe' and 'pretrain.common' sections are read."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Labelled shard set written by `semmae prepare`."),
    metrics: Path = typer.Option(..., help="Probe and k-NN of raw pixels and of a random encoder (JSON)."),
) -> None:
    """The rows that need no pretraining: raw pixels, and a randomly initialised encoder shaped like
    pretrain.common's (MAE's initialisation), probed exactly like the pretrained encoders."""
    from pipeline.config.pretrain import load_pretrain_config
    from pipeline.eval.probe_run import SHAPE_KEYS, probe_references

    cfg = load_stage_config(LinprobeConfig, params, "linprobe")
    shape_cfg = load_pretrain_config(params, None, cfg.seed)
    result = probe_references(cfg, prepared, {k: getattr(shape_cfg, k) for k in SHAPE_KEYS}, _device())
    if result:
        atomic_write_json(metrics, result)
    log.info("done: %s", result)
