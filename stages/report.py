"""DVC stage ``report``: the SemMAE-vs-MAE table, its CSV, every run's curves and the summary metrics (all for git) from every linprobe (and finetune) metrics file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from pipeline.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger("semmae.report")


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Its 'pretrain' and 'linprobe' (and with --finetune, 'finetune') sections name the rows."),
    linprobe: Path = typer.Option(Path("metrics/linprobe"), help="Directory of the linprobe metrics files."),
    pretrain: Path = typer.Option(Path("metrics/pretrain"), help="Directory of the pretrain metrics files."),
    finetune: Optional[Path] = typer.Option(None, help="Directory of the finetune metrics files (<variant>-<seed>.json, scratch-<seed>.json); not given: no fine-tuning columns."),
    out: Path = typer.Option(Path("reports/linprobe.md"), help="The markdown report."),
    table: Path = typer.Option(Path("reports/linprobe.csv"), help="Every row as CSV (DVC bar plots)."),
    pretrain_curves: Path = typer.Option(Path("metrics/pretrain_curves"), help="Directory of the pretrain curves."),
    linprobe_curves: Path = typer.Option(Path("metrics/linprobe_curves"), help="Directory of the probe curves."),
    finetune_curves: Optional[Path] = typer.Option(None, help="Directory of the finetune curves (<run>.tsv); given: curves/finetune.tsv."),
    curves: Path = typer.Option(Path("reports/curves"), help="pretrain.tsv, linprobe.tsv (and finetune.tsv): every run's curves with a run column (DVC plots overlay them)."),
    metrics: Path = typer.Option(Path("metrics/report.json"), help="Per row and metric: mean and sd; every paired comparison's numbers."),
    teacher: Optional[Path] = typer.Option(None, help="The teacher's metrics (its k-NN check joins the summary)."),
    parts: Optional[Path] = typer.Option(None, help="The part learner's metrics (its part quality joins the summary)."),
) -> None:
    """One row per pretrain variant (mean ± sd over pretrain.seeds), the from-scratch fine-tuning row and the
    references; each variant against the MAE baseline (the variant with random masking) and against
    fine-tuning from scratch, paired by seed, with a 95% interval and a plain verdict. With part_sources.sources:
    each source's runs (metrics in <linprobe>/sources and <pretrain>/sources) next to its part IoU, against the
    MAE baseline and the pipeline's own parts."""
    from pipeline.config.base import load_stage_config
    from pipeline.config.finetune import FinetuneConfig
    from pipeline.config.linprobe import LinprobeConfig
    from pipeline.config.part_sources import load_part_sources
    from pipeline.config.pretrain import load_pretrain_config, pretrain_runs
    from pipeline.eval.report import (SCRATCH, SOURCES, ReportError, collect_rows, compare_rows, compare_sources, merge_curves,
                                      part_iou_of, render_csv, render_markdown, render_sources, source_rows,
                                      summary_metrics, upstream_numbers)

    variants, seeds = pretrain_runs(params)
    probe = load_stage_config(LinprobeConfig, params, "linprobe")
    common = load_pretrain_config(params, None, seeds[0])
    for name, path in (("--finetune", finetune), ("--finetune-curves", finetune_curves)):
        if path is not None and not path.is_dir():
            raise ReportError(f"report {name} {path}: no such directory: run the finetune stages (dvc repro), or leave "
                              f"{name} out for a report without fine-tuning")  # fmt: skip
    tuned = load_stage_config(FinetuneConfig, params, "finetune") if finetune is not None else None
    baseline = next((v for v in variants if load_pretrain_config(params, v, seeds[0]).masking == "random"), None)
    rows = collect_rows(linprobe, pretrain, {v: over for v, over in variants.items()}, seeds, finetune)
    comparisons = compare_rows(rows, baseline)
    sources = load_part_sources(params)
    extra, source_comparisons, sections, source_runs = [], [], [], []
    if sources.sources:
        extra = source_rows(linprobe, pretrain, sources.sources, seeds)
        source_comparisons = compare_sources(extra, rows, baseline, sources.variant)
        variant_iou = part_iou_of(parts) if parts is not None else None
        sections = render_sources(extra, rows, source_comparisons, sources.variant, baseline, variant_iou)
        source_runs = [f"{SOURCES}/{n}-{s}" for n in sources.sources for s in seeds]
    comparisons_all = comparisons + source_comparisons
    context = {
        "pretraining (pretrain.common)": f"{common.arch} {common.embed_dim}-d x {common.depth} blocks, patch "
        f"{common.patch_size} at {common.img_size} px, decoder {common.decoder_embed_dim}-d x {common.decoder_depth}; "
        f"{common.epochs} epochs, batch {common.batch_size}, base lr {common.base_lr}, mask ratio {common.mask_ratio}",
        "linear probe (linprobe)": f"{probe.mode} features, {probe.epochs} epochs, batch {probe.batch_size}, base lr "
        f"{probe.base_lr}, LARS (momentum {probe.momentum}, trust {probe.trust_coefficient}), k-NN k={probe.knn_k}",
    }  # fmt: skip
    if tuned is not None:
        context["fine-tuning (finetune)"] = (
            f"{tuned.epochs} epochs, batch {tuned.batch_size}, base lr {tuned.base_lr}, layer decay {tuned.layer_decay}, "
            f"drop path {tuned.drop_path}, mixup {tuned.mixup}, cutmix {tuned.cutmix}, label smoothing "
            f"{tuned.label_smoothing}; from scratch: the same recipe from a random initialisation")  # fmt: skip
    runs = [f"{v}-{s}" for v in variants for s in seeds]
    # every output is built before the first is written: a bad input (a malformed curves file) leaves none
    outputs = {out: render_markdown(rows, comparisons, context, baseline, sections), table: render_csv(rows + extra),
               curves / "pretrain.tsv": merge_curves(pretrain_curves, runs + source_runs),
               curves / "linprobe.tsv": merge_curves(linprobe_curves, runs + source_runs)}  # fmt: skip
    if finetune_curves is not None:
        tuned_runs = runs + [f"{SCRATCH}-{s}" for s in seeds]
        outputs[curves / "finetune.tsv"] = merge_curves(finetune_curves, tuned_runs)
    summary = summary_metrics(rows + extra, comparisons_all, upstream_numbers(teacher, parts))
    for path, text in outputs.items():
        atomic_write_bytes(path, text.encode())
    atomic_write_json(metrics, summary)
    for c in comparisons_all:
        r = c["result"]
        log.info("%s - %s, %s: %s (%s over %d seed(s))", c["a"], c["b"], c["metric"], r.verdict,
                 "no difference measured" if r.mean is None else f"{100 * r.mean:+.2f} points", r.n)  # fmt: skip
