"""DVC stage ``parts_source``: one source of part maps (``part_sources.sources.<name>``), built and exported."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import typer

from pipeline.io import atomic_write_json

log = logging.getLogger("semmae.parts_source")


def main(
    source: str = typer.Option(..., help="Key of part_sources.sources (its overrides of the parts section)."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its 'parts', 'part_sources' and "
                                "'export_parts' sections are read."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Shard set written by `semmae prepare`."),
    teacher: Path = typer.Option(Path("data/teacher"), help="Directory written by `semmae teacher`."),
    features: Path = typer.Option(Path("data/features"), help="Feature set written by `semmae extract`."),
    out: Path = typer.Option(..., help="Output directory: parts/ (as train_parts writes it) and part_shards/ (as "
                             "export_parts writes it)."),
    metrics: Path = typer.Option(..., help="The source's part statistics (and part IoU where the data has ground truth)."),
    figure: Path = typer.Option(..., help="Validation images with the source's part maps (and the true parts) overlaid."),
    resume: Path = typer.Option(..., help="Resume checkpoints of the part learner (kept while a killed run is "
                                "rerun; not a DVC output)."),
) -> None:
    """Build one source's part maps exactly as train_parts builds the method's (without its references), then
    export them exactly as export_parts does, so `pretrain --part-shards OUT/part_shards` masks with them.
    Under `torchrun` rank 0 builds the parts and every rank exports a share of the shards.

    A source is the parts section with its overrides: e.g. {method: kmeans} or {tokens: channel_grouping}.
    """
    import torch

    from pipeline import distributed as D
    from pipeline.config.base import load_stage_config
    from pipeline.config.part_sources import load_part_source
    from pipeline.config.parts import ExportPartsConfig
    from pipeline.parts.build import build_parts
    from pipeline.parts.export import export_parts
    from pipeline.resume import exclusive_run

    cfg = load_part_source(params, source)
    export_cfg = load_stage_config(ExportPartsConfig, params, "export_parts")
    D.init_distributed()  # under torchrun: rank 0 builds the parts, then every rank exports its share of shards
    main = D.is_main()
    tokens = {"tokens": cfg.tokens} if cfg.method in ("learned", "random_teacher") else {}  # the learner's only
    if main:
        log.info("part source %s: method=%s%s", source, cfg.method, "".join(f" {k}={v}" for k, v in tokens.items()))
    with exclusive_run(resume, "parts_source") if main else nullcontext():
        result = {}
        if main:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            result = build_parts(cfg, prepared, teacher, features, out / "parts", figure, device, references=False,
                                 resume_dir=resume)  # fmt: skip
        D.barrier()
        exported = export_parts(export_cfg, prepared, teacher, out / "parts", out / "part_shards")
        if main:
            atomic_write_json(metrics, {"source": source, **tokens, **result, "export": exported})
            log.info("part source %s: %s", source, result.get("parts"))
