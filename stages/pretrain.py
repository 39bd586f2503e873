"""DVC stage ``pretrain``: one MAE run (a masking variant x a seed) on the export_parts shards."""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import typer

from pipeline.config.pretrain import load_pretrain_config
from pipeline.io import atomic_write_json

log = logging.getLogger("semmae.pretrain")


def main(
    variant: str = typer.Option(..., help="Key of pretrain.variants (its overrides of pretrain.common)."),
    seed: int = typer.Option(0, help="Run seed (one of pretrain.seeds)."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its 'pretrain' section is read."),
    part_shards: Path = typer.Option(Path("data/part_shards"), help="Shard set written by `semmae export_parts`."),
    out: Path = typer.Option(..., help="Output directory: encoder.pth (timm ViT), mae.pth, config.json, meta.json."),
    resume: Path = typer.Option(..., help="Resume-checkpoint directory (kept while a killed run is rerun; not a DVC output)."),
    metrics: Path = typer.Option(..., help="Final loss, steps, throughput (JSON)."),
    curves: Path = typer.Option(..., help="Per-step loss, lr and alpha (TSV)."),
) -> None:
    """Pretrain a MAE with the variant's masking (semantic: SemMAE's curriculum; random: plain MAE).

    A killed run rerun with the same parameters continues from the last epoch in RESUME. Runs under
    `torchrun --nproc_per_node=N --no-python semmae pretrain ...` with the same global batch.
    """
    from pipeline.curves import CurveLog
    from pipeline.mae.train import pretrain
    from pipeline.resume import exclusive_run

    cfg = load_pretrain_config(params, variant, seed)
    schedule = f" schedule={cfg.schedule}" if cfg.masking == "semantic" else ""  # the other strategies have none
    log.info("pretrain %s-%d: masking=%s%s epochs=%d batch=%d peak lr %.3g", variant, seed, cfg.masking, schedule,
             cfg.epochs, cfg.batch_size, cfg.peak_lr())  # fmt: skip
    main = int(os.environ.get("RANK", "0")) == 0  # rank 0 under torchrun
    with exclusive_run(resume, "pretrain") if main else nullcontext():
        curve_log = CurveLog(curves, staged=True) if main else None  # replaces `curves` only at success
        start = time.perf_counter()
        rows = curve_log.rows if curve_log else None
        result = pretrain(cfg, part_shards, out, resume, log_row=curve_log, curve_rows=rows)
        if result:
            seconds = time.perf_counter() - start
            trained = (result["epochs"] - result["resumed_from_epoch"]) * result["steps"] // result["epochs"]
            result |= {"seconds": round(seconds, 1), "images_per_second": round(trained * cfg.batch_size / seconds, 1),
                       "variant": variant, "seed": seed}  # fmt: skip
            atomic_write_json(metrics, result)
            curve_log.publish()
            log.info("done: %s", result)
