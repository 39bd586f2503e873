"""DVC stage ``export_parts``: argmax part maps of every prepared image, in shards beside the images."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from pipeline.config.base import load_stage_config
from pipeline.config.parts import ExportPartsConfig
from pipeline.io import atomic_write_json

log = logging.getLogger("semmae.export_parts")


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its 'export_parts' section is read."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Shard set written by `semmae prepare`."),
    teacher: Path = typer.Option(Path("data/teacher"), help="Directory written by `semmae teacher`."),
    parts: Path = typer.Option(Path("data/parts"), help="Directory written by `semmae train_parts`."),
    out: Path = typer.Option(Path("data/part_shards"), help="Output shard set with parts.npy per sample."),
    metrics: Path = typer.Option(Path("metrics/export_parts.json"), help="Counts, grid and N."),
) -> None:
    """Write every train/val image again with its argmax part map (uint8, MAE patch grid) as parts.npy.

    Features are recomputed by the teacher (see pipeline/parts/export.py). Runs under
    `torchrun --nproc_per_node=N --no-python semmae export_parts ...` like extract.
    """
    from pipeline import distributed as D
    from pipeline.parts.export import export_parts

    cfg = load_stage_config(ExportPartsConfig, params, "export_parts")
    result = export_parts(cfg, prepared, teacher, parts, out)
    if D.rank() == 0 and result:
        atomic_write_json(metrics, result)
        log.info("done: %s", result)
