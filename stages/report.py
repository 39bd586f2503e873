"""DVC stage ``report``: the SemMAE-vs-MAE table, its CSV, every run's curves and the summary metrics (all for git) from every linprobe metrics file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from pipeline.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger("semmae.report")


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Its 'pretrain' and 'linprobe' sections name the rows."),
    linprobe: Path = typer.Option(Path("metrics/linprobe"), help="Directory of the linprobe metrics files."),
    pretrain: Path = typer.Option(Path("metrics/pretrain"), help="Directory of the pretrain metrics files."),
    out: Path = typer.Option(Path("reports/linprobe.md"), help="The markdown report."),
    table: Path = typer.Option(Path("reports/linprobe.csv"), help="Every row as CSV (DVC bar plots)."),
    pretrain_curves: Path = typer.Option(Path("metrics/pretrain_curves"), help="Directory of the pretrain curves."),
    linprobe_curves: Path = typer.Option(Path("metrics/linprobe_curves"), help="Directory of the probe curves."),
    curves: Path = typer.Option(Path("reports/curves"), help="pretrain.tsv and linprobe.tsv: every run's curves with a run column (DVC plots overlay them)."),
    metrics: Path = typer.Option(Path("metrics/report.json"), help="Per row and metric: mean and sd; the verdict's numbers."),
    teacher: Optional[Path] = typer.Option(None, help="The teacher's metrics (its k-NN check joins the summary)."),
    parts: Optional[Path] = typer.Option(None, help="The part learner's metrics (its part quality joins the summary)."),
) -> None:
    """One row per pretrain variant (mean ± spread over pretrain.seeds) and per reference; says plainly
    whether SemMAE (variant 'semantic') beat MAE (variant 'random') above seed noise."""
    from pipeline.config.base import load_stage_config
    from pipeline.config.linprobe import LinprobeConfig
    from pipeline.config.pretrain import load_pretrain_config, pretrain_runs
    from pipeline.eval.report import collect_rows, merge_curves, render_csv, render_markdown, summary_metrics, upstream_numbers, verdict

    variants, seeds = pretrain_runs(params)
    probe = load_stage_config(LinprobeConfig, params, "linprobe")
    common = load_pretrain_config(params, None, seeds[0])
    rows = collect_rows(linprobe, pretrain, {v: over for v, over in variants.items()}, seeds)
    result = verdict(rows)
    context = {
        "pretraining (pretrain.common)": f"{common.arch} {common.embed_dim}-d x {common.depth} blocks, patch "
        f"{common.patch_size} at {common.img_size} px, decoder {common.decoder_embed_dim}-d x {common.decoder_depth}; "
        f"{common.epochs} epochs, batch {common.batch_size}, base lr {common.base_lr}, mask ratio {common.mask_ratio}",
        "linear probe (linprobe)": f"{probe.mode} features, {probe.epochs} epochs, batch {probe.batch_size}, base lr "
        f"{probe.base_lr}, LARS (momentum {probe.momentum}, trust {probe.trust_coefficient}), k-NN k={probe.knn_k}",
    }  # fmt: skip
    atomic_write_bytes(out, render_markdown(rows, result, context).encode())
    atomic_write_bytes(table, render_csv(rows).encode())
    runs = [f"{v}-{s}" for v in variants for s in seeds]
    atomic_write_bytes(curves / "pretrain.tsv", merge_curves(pretrain_curves, runs).encode())
    atomic_write_bytes(curves / "linprobe.tsv", merge_curves(linprobe_curves, runs).encode())
    atomic_write_json(metrics, summary_metrics(rows, result, upstream_numbers(teacher, parts)))
    log.info("%s", result["text"])
