"""DVC stage ``prepare``: labelled images -> deterministic WebDataset shards with an index."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from pipeline.config.base import load_stage_config
from pipeline.config.prepare import PrepareConfig
from pipeline.data.prepare import prepare_dataset
from pipeline.io import atomic_write_json

log = logging.getLogger("semmae.prepare")


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its 'prepare' section is read."),
    out: Path = typer.Option(Path("data/prepared"), help="Output shard set (replaced atomically on success)."),
    metrics: Path = typer.Option(Path("metrics/prepare.json"), help="Metrics JSON: counts and skipped images."),
) -> None:
    """Turn Fashion-MNIST idx files or an ImageFolder tree into train/val WebDataset shards.

    Writes OUT/{train,val}/*.tar, OUT/index.json (counts, per-shard sha256, class names) and
    OUT/config.json (the resolved parameters). Same source + params -> byte-identical output.
    """
    cfg = load_stage_config(PrepareConfig, params, "prepare")
    where = f"{cfg.synthetic_size} px, seed {cfg.seed}" if cfg.source == "synthetic_parts" else cfg.root
    log.info("source %s (%s) -> %s", cfg.source, where, out)
    result = prepare_dataset(cfg, out)
    atomic_write_json(metrics, result)
    log.info("done: %s", result)
