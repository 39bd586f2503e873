"""DVC stages ``finetune`` (one pretrain run's encoder) and ``finetune_scratch`` (the same model and recipe
from a random initialisation): MAE's fine-tuning protocol."""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer

from pipeline.config.base import load_stage_config, resolved_config
from pipeline.config.finetune import FinetuneConfig
from pipeline.io import atomic_write_json

log = logging.getLogger("semmae.finetune")


def _run(cfg: FinetuneConfig, shape: dict, prepared: Path, out: Path, seed: int, encoder: Optional[Path],
         metrics: Path, curves: Path, resume: Optional[Path], identity: bytes, name: str, stage: str) -> None:  # fmt: skip
    from pipeline.curves import CurveLog
    from pipeline.finetune import train
    from pipeline.io import file_sha256
    from pipeline.resume import exclusive_run, fingerprint

    from pipeline.data import labelled
    from pipeline.data.shards import read_index

    read_index(prepared)  # a missing or foreign shard set: its clear error, before index.json is hashed
    # the code that decides the weights: a resumed state from other code is not resumed
    code = [p.read_bytes() for p in (*sorted(Path(train.__file__).parent.glob("*.py")), Path(labelled.__file__))]
    fp = fingerprint(resolved_config(cfg, "finetune"), identity, file_sha256(prepared / "index.json"), *code)
    main = int(os.environ.get("RANK", "0")) == 0
    log.info("finetune %s: %d epochs, batch %d, peak lr %.3g, layer decay %s", name, cfg.epochs, cfg.batch_size,
             cfg.peak_lr(), cfg.layer_decay)  # fmt: skip
    with exclusive_run(resume, stage) if resume is not None and main else nullcontext():  # creates `resume`
        curve_log = CurveLog(curves, staged=True) if main else None  # replaces `curves` only at success
        start = time.perf_counter()
        result = train.finetune(cfg, shape, prepared, out, seed, encoder, resume, fp, curve_log,
                                curve_log.rows if curve_log else None)  # fmt: skip
        if result and main:  # every rank returns the metrics; rank 0 alone writes them
            seconds = time.perf_counter() - start
            trained = (result["epochs"] - result["resumed_from_epoch"]) * result["steps"] // result["epochs"]
            result |= {"variant": name.rsplit("-", 1)[0], "seconds": round(seconds, 1),
                       "images_per_second": round(trained * cfg.batch_size / seconds, 1)}  # fmt: skip
            atomic_write_json(metrics, result)
            curve_log.publish()
            log.info("done: %s", result)


def main(
    params: Path = typer.Option(Path("params.yaml"), help="Parameter file; its 'finetune' section is read."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Labelled shard set written by `semmae prepare`."),
    pretrained: Path = typer.Option(..., help="A pretrain output directory (encoder.pth + meta.json)."),
    out: Path = typer.Option(..., help="Output directory: model.pth (the fine-tuned classifier), config.json, meta.json."),
    metrics: Path = typer.Option(..., help="val top-1/top-5 (reported), holdout top-1/top-5 (for choices) (JSON)."),
    curves: Path = typer.Option(..., help="Per-step loss and lr, hold-out top-1 per evaluated epoch (TSV)."),
    resume: Path = typer.Option(None, help="Resume checkpoints (kept while a killed run is rerun; not a DVC output)."),
) -> None:
    """Fine-tune a pretrained encoder end to end with MAE's recipe. Runs under
    `torchrun --nproc_per_node=N --no-python semmae finetune ...` with the same global batch."""
    from pipeline.finetune.train import SHAPE_KEYS, FinetuneError

    cfg = load_stage_config(FinetuneConfig, params, "finetune")
    meta_path = pretrained / "meta.json"
    if not meta_path.is_file() or not (pretrained / "encoder.pth").is_file():
        raise FinetuneError(f"{pretrained} is not a pretrain output (no meta.json / encoder.pth): run dvc repro pretrain")
    meta = json.loads(meta_path.read_text())
    missing = [k for k in (*SHAPE_KEYS, "seed") if k not in meta]
    if missing:
        raise FinetuneError(f"{meta_path}: missing {missing}; rerun its pretrain stage")
    from pipeline.io import file_sha256

    _run(cfg, {k: meta[k] for k in SHAPE_KEYS}, prepared, out, int(meta["seed"]), pretrained / "encoder.pth", metrics,
         curves, resume, file_sha256(pretrained / "encoder.pth").encode(), f"{pretrained.name}", "finetune")  # fmt: skip


def scratch(
    seed: int = typer.Option(0, help="Run seed (one of pretrain.seeds): pairs this run with the pretrained runs of that seed."),
    params: Path = typer.Option(Path("params.yaml"), help="Its 'finetune' and 'pretrain.common' (the shape) sections are read."),
    prepared: Path = typer.Option(Path("data/prepared"), help="Labelled shard set written by `semmae prepare`."),
    out: Path = typer.Option(..., help="Output directory: model.pth, config.json, meta.json."),
    metrics: Path = typer.Option(..., help="val and holdout top-1/top-5 (JSON)."),
    curves: Path = typer.Option(..., help="Per-step loss and lr, hold-out top-1 per evaluated epoch (TSV)."),
    resume: Path = typer.Option(None, help="Resume checkpoints (not a DVC output)."),
) -> None:
    """The no-pretraining reference: the encoder shape of pretrain.common, randomly initialised, fine-tuned
    with exactly the recipe of the pretrained runs."""
    from pipeline.config.pretrain import load_pretrain_config
    from pipeline.finetune.train import SHAPE_KEYS

    cfg = load_stage_config(FinetuneConfig, params, "finetune")
    shape_cfg = load_pretrain_config(params, None, seed)
    shape = {k: getattr(shape_cfg, k) for k in SHAPE_KEYS}
    _run(cfg, shape, prepared, out, seed, None, metrics, curves, resume,
         json.dumps(shape, sort_keys=True).encode(), f"scratch-{seed}", "finetune_scratch")  # fmt: skip
