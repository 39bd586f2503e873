"""DVC stage ``extract``: the frozen teacher's CLS + patch tokens for the prepared images (Arrow IPC)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from pipeline.config.base import load_stage_config
from pipeline.config.extract import ExtractConfig
from pipeline.io import atomic_write_json

log = logging.getLogger("semmae.extract")


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its 'extract' section is read."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Shard set written by `semmae prepare`."),
    teacher: Path = typer.Option(Path("data/teacher"), help="Directory written by `semmae teacher`."),
    out: Path = typer.Option(Path("data/features"), help="Output feature set (replaced atomically on success)."),
    metrics: Path = typer.Option(Path("metrics/extract.json"), help="Row counts, grid and dim."),
) -> None:
    """Run the frozen teacher over the prepared shards and write fp16 CLS + patch tokens as Arrow files.

    Runs under `torchrun --nproc_per_node=N --no-python semmae extract ...`: input shards are split
    across ranks, each writes one Arrow file per shard, and the result equals a one-process run.
    """
    from pipeline import distributed as D
    from pipeline.features import extract_features

    cfg = load_stage_config(ExtractConfig, params, "extract")
    result = extract_features(cfg, prepared, teacher, out)
    if D.rank() == 0 and result:
        atomic_write_json(metrics, result)
        log.info("done: %s", result)
