"""ViT backbones from timm and strict I/O of iBOT checkpoints in the official formats.

Two official iBOT files are accepted:

- ``checkpoint_teacher.pth``: ``{'state_dict': {timm ViT keys}}`` (backbone only);
- ``checkpoint.pth`` (training state): ``{'teacher': {'backbone.*', 'head.*'}, 'student': {...},
  'optimizer': ..., 'epoch': ..., 'args': argparse.Namespace, ...}``.

Projection heads (``head.*``) and ``masked_embed`` are dropped; every other key must match the timm
ViT exactly (names and shapes), except ``pos_embed``, which is resampled when the input grid
differs. Files are read with ``torch.load(weights_only=True)``, allowing only ``argparse.Namespace``
beyond tensors and plain containers: a file that pickles anything else is refused.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
from pathlib import Path
from typing import Optional, Union

import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from pipeline.data.images import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import PipelineError
from pipeline.io import atomic_output_dir, atomic_write_bytes, json_bytes

__all__ = [
    "CheckpointError",
    "build_vit",
    "load_torch_file",
    "load_checkpoint_file",
    "backbone_state_dict",
    "load_backbone",
    "save_backbone",
    "save_timm_export",
    "TIMM_CONFIG_NAME",
    "TIMM_WEIGHTS_NAME",
]

TIMM_CONFIG_NAME = "config.json"  # the names timm's ``local-dir:`` source reads
TIMM_WEIGHTS_NAME = "model.safetensors"
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")

_SAFE_GLOBALS = [argparse.Namespace]
_DROPPED_PREFIXES = ("head.", "masked_embed")


class CheckpointError(PipelineError):
    """A checkpoint file is unreadable, unsafe, of an unknown format or does not fit the model."""


def build_vit(
    arch: str, img_size: int, patch_size: Optional[int] = None, depth: Optional[int] = None,
    num_heads: Optional[int] = None, embed_dim: Optional[int] = None,
) -> VisionTransformer:  # fmt: skip
    """A headless timm ViT (``num_classes=0``), randomly initialised, with optional size overrides.

    ``dynamic_img_size`` lets it take other resolutions too (e.g. iBOT's local crops): the position
    embedding is resampled on the fly; at ``img_size`` the output is exactly the plain model's.
    """
    overrides = {"patch_size": patch_size, "depth": depth, "num_heads": num_heads, "embed_dim": embed_dim}
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    try:
        model = timm.create_model(
            arch, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=True, **kwargs
        )
    except RuntimeError as exc:  # unknown model name
        raise CheckpointError(f"cannot build timm model {arch!r}: {exc}") from exc
    if not isinstance(model, VisionTransformer):
        raise CheckpointError(f"timm model {arch!r} is a {type(model).__name__}, not a VisionTransformer")
    return model


def _unpickling_reason(exc: Exception) -> str:
    """The line of torch's weights-only refusal that says what was refused (the rest is boilerplate)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler error")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(boilerplate)]
    return lines[0] if lines else type(exc).__name__


def load_torch_file(path: Union[str, Path], remedy: str, safe_globals: tuple = ()) -> dict:
    """``torch.load(weights_only=True)`` of a dict (plus ``safe_globals``), on the CPU. Whatever is wrong with
    the file (missing, empty, truncated, not a torch file, pickling code) is a :class:`CheckpointError` naming
    it, followed by ``remedy`` (what to do); a refused pickle is never run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: {remedy}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): {remedy}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickling_reason(exc)
        if "GLOBAL" in reason:  # a class or function the file would have run: a hostile or foreign pickle
            raise CheckpointError(
                f"checkpoint {path} refused: it pickles objects that are not tensors or plain containers ({reason}), "
                f"and such objects are never unpickled here: {remedy}"
            ) from None
        raise CheckpointError(f"checkpoint {path} is not a torch checkpoint ({reason}): {remedy}") from None
    except Exception as exc:  # noqa: BLE001 - torch.load of a damaged or foreign file raises nearly anything
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no detail"
        raise CheckpointError(
            f"checkpoint {path} is not a readable torch checkpoint: truncated, damaged or another kind of file "
            f"({type(exc).__name__}: {detail}): {remedy}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict at the top level, got {type(obj).__name__}: {remedy}")
    return obj


def load_checkpoint_file(path: Union[str, Path]) -> dict:
    """An iBOT checkpoint, or a backbone this pipeline saved (``torch.load`` with ``weights_only=True`` plus
    ``argparse.Namespace``); every error names the file and what to do."""
    remedy = ("restore it (dvc checkout) or rerun the stage that wrote it (dvc repro); a teacher.checkpoint must be "
              "an official iBOT checkpoint_teacher.pth or checkpoint.pth")  # fmt: skip
    return load_torch_file(path, remedy, tuple(_SAFE_GLOBALS))


def backbone_state_dict(obj: dict, path: Union[str, Path] = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The teacher backbone's weights in timm names, from either official format."""
    if isinstance(obj.get("state_dict"), dict):
        sd = dict(obj["state_dict"])
    elif isinstance(obj.get("teacher"), dict):
        sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in obj["teacher"].items()}
    else:
        raise CheckpointError(
            f"checkpoint {path}: unknown format (top-level keys {sorted(map(str, obj))[:10]}); expected "
            "iBOT's checkpoint_teacher.pth ('state_dict') or checkpoint.pth ('teacher')"
        )
    return {k: v for k, v in sd.items() if not k.startswith(_DROPPED_PREFIXES)}


def load_backbone(model: VisionTransformer, path: Union[str, Path]) -> VisionTransformer:
    """Load an official iBOT checkpoint into ``model`` strictly; resample ``pos_embed`` if the grid differs."""
    sd = backbone_state_dict(load_checkpoint_file(path), path)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}(embed_dim={model.embed_dim}, "
            f"depth={len(model.blocks)}): missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. Check teacher.arch/depth/patch_size."
        )
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: '{key}' is a {type(value).__name__}, not a tensor")
        if key == "pos_embed" and value.shape != expected[key].shape and value.ndim == 3:
            prefix = model.num_prefix_tokens
            old = int(round((value.shape[1] - prefix) ** 0.5))
            if old * old + prefix == value.shape[1] and value.shape[2] == expected[key].shape[2]:
                sd[key] = resample_abs_pos_embed(
                    value.float(), list(model.patch_embed.grid_size), [old, old], num_prefix_tokens=prefix
                )
                continue
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"checkpoint {path}: '{key}' has shape {tuple(value.shape)} in the file but "
                f"{tuple(expected[key].shape)} in the model; check teacher.arch/patch_size/depth"
            )
    model.load_state_dict(sd, strict=True)
    return model


def save_backbone(model: VisionTransformer, path: Union[str, Path], dtype: torch.dtype = torch.float16) -> None:
    """Save the backbone in the official ``checkpoint_teacher.pth`` format, atomically."""
    sd = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
          for k, v in sorted(model.state_dict().items())}  # fmt: skip
    buf = io.BytesIO()
    torch.save({"state_dict": sd}, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_timm_export(
    model: VisionTransformer, out_dir: Union[str, Path], arch: str, model_args: dict,
    mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
    interpolation: str = "bicubic", crop_pct: float = 1.0, dtype: torch.dtype = torch.float32,
) -> Path:  # fmt: skip
    """Write ``out_dir`` as a timm model folder: ``config.json`` + ``model.safetensors``, atomically.

    ``timm.create_model(f"local-dir:{out_dir}")`` then builds ``arch`` with ``model_args`` (the keyword
    arguments ``model`` was built with: ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``;
    ``num_classes=0``, the model's ``global_pool`` and ``dynamic_img_size`` are added) and loads the
    weights strictly; its ``pretrained_cfg`` holds the preprocessing the encoder was trained with
    (``mean``/``std`` of [0, 1] pixels, the input size, ``interpolation``, ``crop_pct``), so
    ``timm.data.resolve_data_config({}, model=m)`` gives the right transform. Before anything is written,
    ``arch`` + ``model_args`` are built on the meta device and must give exactly ``model``'s weight names
    and shapes. The same model gives the same bytes.
    """

    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"timm export to {out_dir}: {problem}")

    if not isinstance(model, VisionTransformer):
        raise refuse(f"expected a timm VisionTransformer, got {type(model).__name__}")
    if model.num_classes != 0:
        raise refuse(f"the model has a {model.num_classes}-class head; export the headless encoder (num_classes=0)")
    for name, value in (("mean", mean), ("std", std)):
        numbers = len(value) == 3 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
        if not numbers or (name == "std" and min(value) <= 0):
            above = " above 0" if name == "std" else ""
            raise refuse(f"{name}={value!r} must be three finite numbers{above} (per-channel statistics of [0, 1] pixels)")
    if interpolation not in _INTERPOLATIONS:
        raise refuse(f"interpolation={interpolation!r} is not one of {_INTERPOLATIONS}")
    if not 0 < crop_pct <= 1:
        raise refuse(f"crop_pct={crop_pct} must be in (0, 1]")
    args = dict(model_args)
    implied = {"num_classes": 0, "global_pool": model.global_pool}
    if model.dynamic_img_size:  # takes other resolutions too (build_vit's encoders do)
        implied["dynamic_img_size"] = True
    for key, want in implied.items():
        if args.setdefault(key, want) != want:
            raise refuse(f"model_args {key}={args[key]!r} but the model has {want!r}")
    try:
        json.dumps(args)
    except (TypeError, ValueError) as exc:
        raise refuse(f"model_args must be JSON values (numbers, strings, lists): {exc}") from None
    try:
        with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
            rebuilt = timm.create_model(arch, pretrained=False, **args)
    except Exception as exc:  # an unknown name or keyword: timm raises RuntimeError, TypeError, ...
        raise refuse(f"timm cannot build {arch!r} with model_args {args}: {exc}") from None
    ours = model.state_dict()
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    wrong = sorted(k for k in set(ours) | set(theirs) if k not in ours or tuple(ours[k].shape) != theirs.get(k))
    if wrong:
        detail = ", ".join(f"{k}: model {tuple(ours[k].shape) if k in ours else None} vs timm {theirs.get(k)}"
                           for k in wrong[:4])  # fmt: skip
        more = " ..." if len(wrong) > 4 else ""
        raise refuse(f"timm.create_model({arch!r}, **{args}) does not fit the model ({detail}{more}); "
                     "pass the model_args it was built with")  # fmt: skip
    fixed = bool(getattr(model.patch_embed, "strict_img_size", True)) and not model.dynamic_img_size
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": model.num_features,
        "global_pool": model.global_pool,
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [model.patch_embed.proj.in_channels, *(int(v) for v in model.patch_embed.img_size)],
            "fixed_input_size": fixed,
            "interpolation": interpolation,
            "crop_pct": float(crop_pct),
            "crop_mode": "center",
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "custom_load": False,
        },
    }
    sd = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
          for k, v in sorted(ours.items())}  # fmt: skip
    weights = safetensors.torch.save(sd, metadata={"format": "pt"})
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as tmp:
        (tmp / TIMM_CONFIG_NAME).write_bytes(json_bytes(config))
        (tmp / TIMM_WEIGHTS_NAME).write_bytes(weights)
    return out_dir
