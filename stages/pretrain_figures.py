"""DVC stage ``pretrain_figures``: reconstruction and mask figures of one finished pretrain run."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

log = logging.getLogger("semmae.pretrain_figures")


def main(
    pretrained: Path = typer.Option(..., help="A pretrain output directory (config.json + mae.pth, written by `semmae pretrain`)."),
    part_shards: Path = typer.Option(Path("data/part_shards"), help="Shard set written by `semmae export_parts` (its val split)."),
    out: Path = typer.Option(..., help="Directory for reconstruction.png and curriculum_masks.png."),
) -> None:
    """Draw a pretrain run's figures: reconstructions of the first validation images, and its masks
    (SemMAE: at t = 0, T/2, T of the curriculum; MAE with random masking: three independent draws).

    The run's own config.json is the configuration (no params.yaml); runs on the CPU, and the same
    inputs give byte-identical PNGs.
    """
    from pipeline.mae.figures import draw_pretrain_figures

    for path in draw_pretrain_figures(pretrained, part_shards, out):
        log.info("wrote %s", path)
