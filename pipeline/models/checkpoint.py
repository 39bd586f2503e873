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
import pickle
from pathlib import Path
from typing import Optional, Union

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from pipeline.errors import PipelineError
from pipeline.io import atomic_write_bytes

__all__ = [
    "CheckpointError",
    "build_vit",
    "load_checkpoint_file",
    "backbone_state_dict",
    "load_backbone",
    "save_backbone",
]

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


def load_checkpoint_file(path: Union[str, Path]) -> dict:
    """``torch.load`` with ``weights_only=True`` (plus ``argparse.Namespace``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: give the path of an iBOT checkpoint_teacher.pth or checkpoint.pth")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} refused: it holds pickled objects that are not plain tensors or containers "
            f"({first}). Only official iBOT files (or files saved by this pipeline) are accepted."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable torch file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict at the top level, got {type(obj).__name__}")
    return obj


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
