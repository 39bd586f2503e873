"""The ``linprobe`` stages' logic: probe one pretrained encoder, or the two references that need no
pretraining (raw pixels; a randomly initialised encoder of the same shape). Every probe trains on
``train``, chooses its lr on ``holdout`` and reports ``val`` (:mod:`pipeline.eval.linprobe`)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from pipeline import distributed as D
from pipeline.config.base import resolved_config
from pipeline.config.linprobe import LinprobeConfig
from pipeline.data.shards import read_index, shard_entries
from pipeline.errors import PipelineError
from pipeline.eval.encode import encode_splits, pixel_encoder, vit_encoder
from pipeline.eval.linprobe import PROBE_SPLITS, online_batch, probe_cached, probe_online
from pipeline.io import atomic_output_dir, file_sha256
from pipeline.models.checkpoint import build_vit, load_backbone
from pipeline.resume import ResumeStore, fingerprint

__all__ = ["probe_pretrained", "probe_references", "load_encoder", "ProbeError"]

log = logging.getLogger(__name__)
SHAPE_KEYS = ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads")


class ProbeError(PipelineError):
    """The encoder or the data to probe is missing or inconsistent; the message says which."""


def load_encoder(pretrain_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """The frozen timm ViT saved by ``pretrain`` (``encoder.pth`` + ``meta.json``), loaded strictly."""
    pretrain_dir = Path(pretrain_dir)
    meta_path = pretrain_dir / "meta.json"
    if not meta_path.is_file():
        raise ProbeError(f"{meta_path} not found: {pretrain_dir} is not a pretrain output (run dvc repro pretrain)")
    meta = json.loads(meta_path.read_text())
    missing = [k for k in SHAPE_KEYS if k not in meta]
    if missing:
        raise ProbeError(f"{meta_path}: missing {missing}")
    vit = build_vit(meta["arch"], meta["img_size"], meta["patch_size"], meta["depth"], meta["num_heads"],
                    meta["embed_dim"])  # fmt: skip
    return load_backbone(vit, pretrain_dir / "encoder.pth"), meta


def _classes(prepared: Path, labels: dict[str, torch.Tensor]) -> int:
    classes = len(read_index(prepared)["classes"])
    every = torch.cat(list(labels.values()))
    if len(every) and (int(every.max()) >= classes or int(every.min()) < 0):
        raise ProbeError(f"{prepared}: labels outside [0, {classes}) for the {classes} classes of index.json")
    return classes


def _check_class_counts(prepared: Path) -> None:
    """Before any encoding: the three splits exist, and every class that has hold-out or validation images
    has training images (else its head output is never trained and its images count as errors for no
    fault of the encoder)."""
    index = read_index(prepared)
    classes = index["classes"]
    missing = [s for s in PROBE_SPLITS if s not in index["splits"]]
    if missing:
        raise ProbeError(f"{prepared}/index.json has no {missing} split (has {sorted(index['splits'])}): the probe "
                         "chooses its lr on 'holdout' and reports 'val'; rerun prepare (prepare.holdout_size)")  # fmt: skip
    counts = {s: index["splits"][s].get("class_counts") for s in PROBE_SPLITS}
    if any(not isinstance(c, list) or len(c) != len(classes) for c in counts.values()):
        raise ProbeError(f"{prepared}/index.json: class_counts do not match its {len(classes)} classes: rerun prepare")
    untrained = [name for name, t, h, v in zip(classes, counts["train"], counts["holdout"], counts["val"])
                 if (v or h) and not t]  # fmt: skip
    if untrained:
        raise ProbeError(f"{prepared}: classes {untrained[:5]} have hold-out or validation but no training images, so "
                         "the probe head cannot learn them: raise prepare.train_limit or add training images for them")


def _probe(cfg: LinprobeConfig, prepared: Path, img_size: int, encoders: dict, device: torch.device,
           log_row: Optional[Callable[[int, dict], None]] = None, desc: str = "linprobe", store=None,
           curve_rows: Optional[list] = None) -> tuple[dict, dict]:  # fmt: skip
    """``{encoder name: (metrics, head)}`` on rank 0 (``{}`` on the others). The splits are streamed, never
    held in memory: cached mode encodes them once through every encoder (squared with ``cfg.eval_crop_pct``)
    and rank 0 trains the heads on the features; online mode streams the training images every epoch
    (every rank its share of each batch) and scores the heads on the streamed hold-out and validation
    images (evaluation crop of ``eval_crop_pct``), the k-NN on features encoded once as in cached mode."""
    results = {}
    _check_class_counts(prepared)
    if cfg.mode == "online":  # before any encoding: the global batch must split over the ranks
        n_train = sum(e.num_samples for e in shard_entries(prepared, "train"))
        try:
            online_batch(cfg, n_train, D.world_size())
        except ValueError as exc:
            raise ProbeError(f"{prepared}: {exc}") from None
    feats, labels = encode_splits(prepared, img_size, encoders, cfg.eval_batch_size, desc=f"{desc}: encode",
                                  splits=PROBE_SPLITS, crop_pct=cfg.eval_crop_pct)  # fmt: skip
    classes = _classes(prepared, labels)
    if cfg.mode == "online":
        splits = {}
        for split in PROBE_SPLITS:
            entries = shard_entries(prepared, split)
            splits[split] = ([e.path for e in entries], [e.num_samples for e in entries])
        results = probe_online(encoders, splits, img_size, feats, labels, classes, cfg, device, log_row,
                               desc=desc.strip() or "linprobe", store=store, curve_rows=curve_rows)  # fmt: skip
        return (results, {"num_classes": classes}) if D.is_main() else ({}, {})
    if not D.is_main():  # under torchrun the ranks share the encoding; rank 0 trains the (cheap) heads
        return {}, {}
    for name, f in feats.items():
        results[name] = probe_cached(f, labels, classes, cfg, device, log_row, desc=f"{desc} {name}".strip(),
                                     store=store, curve_rows=curve_rows)  # fmt: skip
    return results, {"num_classes": classes}


def _save_head(head: torch.nn.Module, path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"head": {k: v.detach().cpu() for k, v in sorted(head.state_dict().items())}}, buf)
    path.write_bytes(buf.getvalue())


def probe_pretrained(cfg: LinprobeConfig, prepared: str | Path, pretrain_dir: str | Path, out_dir: str | Path,
                     device: torch.device, log_row: Optional[Callable[[int, dict], None]] = None,
                     resume_dir: Optional[str | Path] = None, curve_rows: Optional[list] = None) -> dict:  # fmt: skip
    """Linear probe + k-NN of one pretrained encoder; writes ``head.pth`` + ``config.json`` into ``out_dir``."""
    vit, meta = load_encoder(pretrain_dir)
    D.init_distributed()
    store = None
    if resume_dir is not None:  # a killed probe continues its head training from the last epoch (rank 0 saves)
        code = [p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py"))]
        store = ResumeStore(resume_dir, fingerprint(resolved_config(cfg, "linprobe"), (Path(pretrain_dir) / "meta.json").read_bytes(),
                                                    file_sha256(Path(pretrain_dir) / "encoder.pth"),
                                                    (Path(prepared) / "index.json").read_bytes(), *code))  # fmt: skip
    results, info = _probe(cfg, Path(prepared), meta["img_size"], {"": vit_encoder(vit, device)}, device, log_row,
                           store=store, curve_rows=curve_rows,
                           desc=f"linprobe {meta.get('masking', '')}")  # fmt: skip
    if not D.is_main():
        return {}
    metrics, head = results[""]
    classes = info["num_classes"]
    with atomic_output_dir(out_dir) as tmp:
        _save_head(head, tmp / "head.pth")
        (tmp / "config.json").write_bytes(resolved_config(cfg, "linprobe"))
    if store is not None:
        store.clear()  # the outputs are written: nothing to resume
    return {**metrics, "masking": meta.get("masking"), "seed": meta.get("seed"), "pretrain_epochs": meta.get("epochs"),
            "num_classes": classes}  # fmt: skip


def probe_references(cfg: LinprobeConfig, prepared: str | Path, shape: dict, device: torch.device) -> dict:
    """The rows that need no pretraining: raw pixels, and a random encoder of ``shape`` (MAE's init)."""
    from pipeline.config.pretrain import PretrainConfig
    from pipeline.mae.model import build_mae

    encoder = build_mae(PretrainConfig(**{k: shape[k] for k in SHAPE_KEYS}, seed=cfg.seed)).encoder
    encoders = {"raw pixels": pixel_encoder(cfg.pixel_size), "random encoder": vit_encoder(encoder, device)}
    D.init_distributed()
    results, info = _probe(cfg, Path(prepared), shape["img_size"], encoders, device)
    if not D.is_main():
        return {}
    return {"raw_pixels": results["raw pixels"][0], "random_encoder": results["random encoder"][0], **info}
