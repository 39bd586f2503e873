"""Whole-file checks of ``params.yaml``: every section's config, and the values that must agree *across*
stages (the MAE grid and the part-map grid, batch sizes and the data, loader streams and shards...).

Each stage reads only its own section, so without this a mismatch between, say, ``export_parts.grid``
and ``pretrain.common.patch_size`` would surface when ``pretrain`` starts, an hour into ``dvc repro``.
Every ``semmae`` stage runs :func:`check_params` on its parameter file before it computes anything
(and ``semmae check`` runs it alone), so the first stage of the DAG fails instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from pipeline.config.base import ConfigError, load_stage_config, read_params
from pipeline.config.extract import ExtractConfig
from pipeline.config.finetune import FinetuneConfig
from pipeline.config.linprobe import LinprobeConfig
from pipeline.config.part_sources import load_part_sources
from pipeline.config.parts import ExportPartsConfig, PartsConfig
from pipeline.config.prepare import PrepareConfig
from pipeline.config.pretrain import PretrainConfig, load_pretrain_config, valid_seeds
from pipeline.config.teacher import TeacherConfig

__all__ = ["check_params", "ParamsReport", "FASHION_MNIST_TRAIN"]

FASHION_MNIST_TRAIN = 60_000
SECTIONS = {"prepare": PrepareConfig, "teacher": TeacherConfig, "extract": ExtractConfig, "parts": PartsConfig,
            "export_parts": ExportPartsConfig, "linprobe": LinprobeConfig, "finetune": FinetuneConfig}  # fmt: skip
# the extract splits downstream stages read: train_parts trains on train's features and measures on val's
EXTRACT_SPLITS_NEEDED = ("train", "val")


class ParamsReport:
    """The loaded configs of a parameter file, and what :func:`check_params` found (errors, warnings)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.configs: dict[str, Any] = {}
        self.runs: dict[str, PretrainConfig] = {}
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(f"{self.path}: {msg}")

    def add(self, exc: ConfigError) -> None:
        """The lines of ``exc`` not reported yet (every pretrain run repeats the errors of pretrain.common)."""
        seen = {line for e in self.errors for line in e.splitlines()}
        lines = [line for line in str(exc).splitlines() if line not in seen]
        if lines:
            self.errors.append("\n".join(lines))

    def warn(self, msg: str) -> None:
        self.warnings.append(f"{self.path}: {msg}")

    def raise_errors(self) -> None:
        if self.errors:
            raise ConfigError("\n".join(self.errors))


def _train_images(prep: Optional[PrepareConfig]) -> Optional[int]:
    """Train images the prepare section will produce, when knowable from the parameters alone."""
    if prep is None:
        return None
    if prep.source == "fashion_mnist":  # the hold-out is carved out of the 60k first, train_limit draws from the rest
        rest = max(FASHION_MNIST_TRAIN - prep.holdout_size, 0)
        return min(prep.train_limit or rest, rest)
    return prep.train_limit  # imagefolder: at most that; synthetic_parts: exactly (generated; required there)


FASHION_MNIST_CLASSES = 10


def _num_classes(prep: Optional[PrepareConfig]) -> Optional[int]:
    """Classes the prepare section will produce (the probe head's outputs), when knowable cheaply: 10 for
    Fashion-MNIST, the generator's classes for synthetic_parts, the class folders of an imagefolder's train_dir
    (listed, not read)."""
    if prep is None:
        return None
    if prep.source == "fashion_mnist":
        return FASHION_MNIST_CLASSES
    if prep.source == "synthetic_parts":
        from pipeline.data.synthetic_parts import CLASSES  # here, not at the top: configs import no data code

        return len(CLASSES)
    train = Path(prep.root) / prep.train_dir  # as prepare resolves it: relative to the working directory
    if not train.is_dir():
        return None  # prepare itself names the missing directory
    return sum(1 for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_params(params_path: str | Path) -> ParamsReport:
    """Validate every section present in ``params_path`` and the cross-stage constraints between them.

    Sections that are absent are skipped (a stage's defaults apply to it alone). Returns the report;
    ``report.raise_errors()`` raises one :class:`ConfigError` listing every problem.
    """
    path = Path(params_path)
    rep = ParamsReport(path)
    raw = read_params(path)
    for name, model in SECTIONS.items():
        if name in raw:
            try:
                rep.configs[name] = load_stage_config(model, path, name)
            except ConfigError as exc:
                rep.add(exc)
    if "pretrain" in raw:
        _check_pretrain(rep, raw["pretrain"])
    if "part_sources" in raw:  # a bad parts key is reported once: rep.add drops lines already reported
        try:
            rep.configs["part_sources"] = load_part_sources(path)
        except ConfigError as exc:
            rep.add(exc)
    _cross_checks(rep)
    return rep


def _check_pretrain(rep: ParamsReport, section: Any) -> None:
    """Every run variant x seed, and ``pretrain.common`` alone (the shape of the random-encoder and from-scratch
    references) and each variant even when there is no run to load (``seeds: []``, ``variants: {}``)."""
    section = section if isinstance(section, dict) else {}
    variants = section.get("variants")
    names = list(variants) if isinstance(variants, dict) else []
    seeds = section.get("seeds", [0])
    ok = valid_seeds(seeds)
    for variant in [None, *names]:
        for seed in seeds if ok and variant is not None else [0]:
            try:
                cfg = load_pretrain_config(rep.path, variant, seed)
            except ConfigError as exc:
                rep.add(exc)
                break  # the other seeds of this variant would repeat its error
            if variant is not None:
                rep.runs[f"{variant}-{seed}"] = cfg


def _teacher_grid(rep: ParamsReport, teacher: TeacherConfig) -> Optional[int]:
    """Side of the teacher's patch grid. ``teacher.patch_size: null`` keeps the arch's patch size: the ViT the
    teacher stage builds is built here on the meta device (no weights) to read it; None if it cannot be built."""
    if teacher.patch_size is not None:
        return teacher.img_size // teacher.patch_size
    import torch

    from pipeline.errors import PipelineError
    from pipeline.teacher.load import teacher_vit

    try:
        with torch.device("meta"):
            vit = teacher_vit(teacher)
    except PipelineError as exc:
        rep.error(f"'teacher.arch' = {teacher.arch!r} cannot be built: {exc}")
        return None
    patch = vit.patch_embed.patch_size[0]
    kept = f"the patch size {patch} of teacher.arch {teacher.arch!r} (teacher.patch_size: null keeps it)"
    for key, size in (("teacher.img_size", teacher.img_size), ("teacher.train.local_size", teacher.train.local_size)):
        if size % patch:
            rep.error(f"'{key}' = {size} is not a multiple of {kept}: change it, or set teacher.patch_size")
    return teacher.img_size // patch


def _cross_checks(rep: ParamsReport) -> None:
    c = rep.configs
    prep, teacher, parts, export = c.get("prepare"), c.get("teacher"), c.get("parts"), c.get("export_parts")
    extract, probe = c.get("extract"), c.get("linprobe")
    n_train = _train_images(prep)
    n_classes = _num_classes(prep)
    if n_classes:  # the probe head has one output per class of prepared/index.json
        for key, limit in (("train_limit", prep.train_limit), ("val_limit", prep.val_limit),
                           ("holdout_size", prep.holdout_size)):  # fmt: skip
            if limit is not None and limit < n_classes:
                msg = (f"'prepare.{key}' = {limit} is below the {n_classes} classes: some classes get no "
                       f"{key.split('_')[0]} image while the linear-probe head has {n_classes} outputs; set it to at least "
                       f"{n_classes} (many images per class, in practice)")  # fmt: skip
                (rep.error if key == "train_limit" else rep.warn)(msg)
    if prep is not None and prep.source == "fashion_mnist" and prep.holdout_size > FASHION_MNIST_TRAIN - FASHION_MNIST_CLASSES:
        rep.error(f"'prepare.holdout_size' = {prep.holdout_size} leaves no training image of some class: Fashion-MNIST "
                  f"has {FASHION_MNIST_TRAIN} training images in {FASHION_MNIST_CLASSES} classes; lower it")  # fmt: skip
    teacher_grid = _teacher_grid(rep, teacher) if teacher is not None else None
    if teacher is not None and teacher.init == "checkpoint" and not Path(teacher.checkpoint).is_file():
        rep.error(f"'teacher.checkpoint' = {teacher.checkpoint!r} does not exist: download the official iBOT "
                  "checkpoint there, or set teacher.init: train")  # fmt: skip
    sources = c.get("part_sources")
    part_configs = {"parts": parts} if parts is not None else {}  # the pipeline's parts and every source's
    part_configs |= {f"part_sources.sources.{n}": cfg for n, cfg in (sources.configs.items() if sources else ())}
    for where, cfg in part_configs.items():
        fixed_n = cfg.method in ("attention_heads", "ground_truth")  # N from the teacher's heads / the part names
        if teacher_grid is not None and not fixed_n and cfg.num_parts > teacher_grid**2:
            what = f"'parts.num_parts' = {cfg.num_parts}" if where == "parts" else f"{where}: num_parts = {cfg.num_parts}"
            rep.error(f"{what} exceeds the {teacher_grid}x{teacher_grid} patches of the teacher (teacher.img_size / "
                      "teacher.patch_size)")  # fmt: skip
        if cfg.method == "ground_truth" and prep is not None and prep.source != "synthetic_parts":
            rep.error(f"'{where}.method' = 'ground_truth' needs true part masks, which only prepare.source: "
                      f"synthetic_parts writes (prepare.source is {prep.source!r}): choose another method")  # fmt: skip
    map_grid = None
    if export is not None:
        map_grid = export.grid if export.grid is not None else teacher_grid
    if map_grid is not None:
        for run, cfg in rep.runs.items():
            if cfg.grid != map_grid:
                where = "export_parts.grid" if export.grid is not None else "the teacher's grid (export_parts.grid: null)"
                rep.error(f"pretrain@{run}: the MAE grid img_size/patch_size = {cfg.img_size}/{cfg.patch_size} = "
                          f"{cfg.grid} differs from {where} = {map_grid}: part maps must sit on the MAE's patches; "
                          f"set export_parts.grid: {cfg.grid}")  # fmt: skip
    for run, cfg in rep.runs.items():
        if int(cfg.grid**2 * (1 - cfg.mask_ratio)) < 1:
            rep.error(f"pretrain@{run}: mask_ratio={cfg.mask_ratio} leaves no visible patch of {cfg.grid**2}")
        if n_train is not None and cfg.batch_size > n_train:
            rep.error(f"pretrain@{run}: batch_size={cfg.batch_size} exceeds the {n_train} train images "
                      "(prepare.train_limit, after prepare.holdout_size)")  # fmt: skip
        if n_train is not None and cfg.loader_streams is not None and prep is not None:
            shards = math.ceil(n_train / prep.shard_size)
            if cfg.loader_streams > shards:
                rep.error(f"pretrain@{run}: loader_streams={cfg.loader_streams} exceeds the {shards} train shards "
                          f"({n_train} images / prepare.shard_size {prep.shard_size}): lower one of them")  # fmt: skip
        if cfg.loader_streams is not None and (cfg.batch_size // cfg.accum_steps) % cfg.loader_streams:
            rep.error(f"pretrain@{run}: batch_size/accum_steps = {cfg.batch_size // cfg.accum_steps} is not a multiple "
                      f"of loader_streams={cfg.loader_streams}")  # fmt: skip
    if n_train is not None:
        trained = teacher is not None and teacher.init == "train"
        for key, value in (("teacher.train.batch_size", teacher.train.batch_size if trained else None),
                           ("linprobe.batch_size", probe.batch_size if probe is not None else None),
                           ("finetune.batch_size", c["finetune"].batch_size if "finetune" in c else None)):  # fmt: skip
            if value is not None and value > n_train:
                rep.error(f"'{key}' = {value} exceeds the {n_train} train images (prepare.train_limit, after prepare.holdout_size)")
    if prep is not None and prep.resize is not None:
        for run, cfg in rep.runs.items():
            if prep.resize < cfg.img_size:
                rep.warn(f"prepare.resize={prep.resize} is below pretrain@{run} img_size={cfg.img_size}: crops are upsampled")
    if extract is not None and set(EXTRACT_SPLITS_NEEDED) - set(extract.splits):
        missing = sorted(set(EXTRACT_SPLITS_NEEDED) - set(extract.splits))
        rep.error(f"'extract.splits' = {extract.splits} lacks {', '.join(missing)}: train_parts reads the features of "
                  f"both train and val; set extract.splits: [{', '.join(EXTRACT_SPLITS_NEEDED)}]")  # fmt: skip
    if extract is not None and export is not None and extract.batch_size != export.batch_size:
        rep.warn(f"extract.batch_size={extract.batch_size} != export_parts.batch_size={export.batch_size}: exported "
                 "maps can differ in the last bits from maps of the stored features")  # fmt: skip
