"""Part IoU of predicted part maps against ground-truth part masks, after an optimal one-to-one matching.

The part learner's ids are unordered (id 3 of one run is id 0 of another), so they are scored after
matching them to the true parts. The protocol, precisely:

1. Confusion: ``conf[b, i, j]`` = number of pixels of image ``b`` with predicted id ``i`` (``0 <= i < N``)
   and true class ``j`` (``0 <= j <= P``; ``j = 0`` is background, ``1..P`` the true parts).
2. Dataset-level IoU (like segmentation benchmarks): summed over all images first,
   ``iou[i, j] = C[i, j] / (|pred == i| + |truth == j| - C[i, j])``; an image-by-image average would let
   small images weigh as much as large ones and reward ids whose meaning changes between images.
3. Matching: ``scipy.optimize.linear_sum_assignment`` on the ``N x (P + 1)`` IoU matrix, maximising the
   total IoU; one-to-one, so ``min(N, P + 1)`` pairs. Background is a column like the parts: the learner
   has no reserved background id, so the id that covers background may claim it instead of being spent on
   a foreground part (background pixels still count in every union, so an id spilling over background is
   penalised either way).
4. Scores: a true class left unmatched (``N < P + 1``) scores 0; extra predicted ids (``N > P + 1``) are
   unmatched and only count through the unions of the parts they overlap. A class with no pixels in the
   whole set scores NaN and is left out of the means. ``miou`` is the mean over the true parts ``1..P``
   (``ignore_background=True``) or over ``0..P`` (``False``); matching is the same in both cases.
5. Per image (cheap from the same confusion): the same dataset-level matching, IoU per image, averaged over
   the classes present in that image, then over the images that have any (a fixed id -> part map, since a
   model's ids mean the same thing in every image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment  # Hungarian: exact, O(n^3), tested; no reason to hand-write

__all__ = ["PartIoU", "part_iou", "part_confusion", "part_iou_from_confusion", "class_part_iou", "upsample_ids",
           "patch_majority"]

Ids = Union[np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class PartIoU:
    """Result of :func:`part_iou` (see the module docstring for the protocol).

    ``per_part[j]`` and ``match[j]`` are indexed by true class ``j`` (0 = background, ``1..P`` the parts);
    ``match[j]`` is the predicted id matched to it, -1 when unmatched. ``iou`` is the full ``N x (P + 1)``
    dataset-level IoU matrix the matching was made on.
    """

    miou: float
    per_part: np.ndarray
    match: np.ndarray
    iou: np.ndarray
    per_image_miou: float
    num_ids: int
    num_parts: int
    ignore_background: bool


def _as_ids(x: Ids, name: str) -> torch.Tensor:
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name}: expected a numpy array or torch tensor of int ids, got {type(x).__name__}")
    t = torch.as_tensor(x)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name}: expected integer ids, got dtype {t.dtype}; convert with .long() / .astype(np.int64)")
    if t.dim() != 3:
        raise ValueError(f"{name}: expected shape [B, H, W], got {tuple(t.shape)}")
    return t.long()


def part_confusion(pred: Ids, truth: Ids, num_ids: int, num_parts: int) -> np.ndarray:
    """Per-image confusion ``int64 [B, N, P + 1]`` of predicted ids ``[0, N)`` against true classes ``[0, P]``.

    Validates the inputs (same ``[B, H, W]`` shape, integer ids in range); concatenating the results of
    several batches along axis 0 gives what :func:`part_iou_from_confusion` needs for a whole set.
    """
    if not (isinstance(num_ids, int) and num_ids >= 1):
        raise ValueError(f"num_ids={num_ids!r}: the number of predicted part ids N, an int >= 1")
    if not (isinstance(num_parts, int) and num_parts >= 1):
        raise ValueError(f"num_parts={num_parts!r}: the number of true foreground parts P, an int >= 1")
    p, t = _as_ids(pred, "pred"), _as_ids(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred has shape {tuple(p.shape)} but truth has {tuple(t.shape)}: "
                         "they must match pixel for pixel")
    t = t.to(p.device)
    checks = (("pred", p, num_ids - 1, f"num_ids={num_ids}"),
              ("truth", t, num_parts, f"num_parts={num_parts} (0 = background, 1..P = parts)"))
    for name, x, hi, what in checks:
        if x.numel() and int(x.min()) < 0:
            raise ValueError(f"{name} has a negative id ({int(x.min())}); ids must be >= 0")
        if x.numel() and int(x.max()) > hi:
            raise ValueError(f"{name} has id {int(x.max())} > {hi}, out of range for {what}; "
                             "raise it or fix the ids")
    b, k = p.shape[0], num_parts + 1
    flat = (torch.arange(b, device=p.device).view(b, 1, 1) * num_ids + p) * k + t
    return torch.bincount(flat.flatten(), minlength=b * num_ids * k).view(b, num_ids, k).cpu().numpy()


def _iou(conf: np.ndarray) -> np.ndarray:
    """IoU of every (pred id, true class) pair from a confusion ``[..., N, P + 1]``; 0/0 (both empty) -> 0."""
    conf = conf.astype(np.float64)
    union = conf.sum(-1, keepdims=True) + conf.sum(-2, keepdims=True) - conf
    return np.divide(conf, union, out=np.zeros_like(conf), where=union > 0)


def part_iou_from_confusion(conf: np.ndarray, ignore_background: bool = True) -> PartIoU:
    """:class:`PartIoU` from a per-image confusion ``[B, N, P + 1]`` (:func:`part_confusion`)."""
    conf = np.asarray(conf)
    if conf.ndim != 3 or conf.shape[2] < 2 or conf.shape[1] < 1:
        raise ValueError(f"conf: expected a per-image confusion [B, N, P + 1] with N >= 1, P >= 1, got {conf.shape}")
    _, n, k = conf.shape
    total = conf.sum(0)
    iou = _iou(total)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    match = np.full(k, -1, dtype=np.int64)
    match[cols] = rows
    present = total.sum(0) > 0  # true class has pixels somewhere in the set
    per_part = np.where(present, 0.0, np.nan)
    per_part[cols] = np.where(present[cols], iou[rows, cols], np.nan)
    scored = slice(1, None) if ignore_background else slice(None)
    miou = float(np.nanmean(per_part[scored])) if present[scored].any() else float("nan")

    # per image: same matching, classes present in each image, images with any such class
    img_iou = _iou(conf)  # [B, N, P + 1]
    img_present = conf.sum(1) > 0  # [B, P + 1]
    img_part = np.zeros(img_present.shape)
    img_part[:, cols] = img_iou[:, rows, cols]
    img_part, img_present = img_part[:, scored], img_present[:, scored]
    counts = img_present.sum(1)
    per_image = (img_part * img_present).sum(1)[counts > 0] / counts[counts > 0]
    per_image_miou = float(per_image.mean()) if len(per_image) else float("nan")
    return PartIoU(miou, per_part, match, iou, per_image_miou, n, k - 1, bool(ignore_background))


def part_iou(pred: Ids, truth: Ids, ignore_background: bool = True, *, num_ids: int, num_parts: int) -> PartIoU:
    """Mean IoU of predicted part maps against true parts after optimal one-to-one matching.

    ``pred [B, H, W]``: int predicted part ids in ``[0, num_ids)``; ``truth [B, H, W]``: int true classes in
    ``[0, num_parts]``, 0 = background. Numpy arrays or torch tensors (any device). Protocol (module
    docstring): dataset-level confusion, Hungarian matching of ids to background + parts maximising total
    IoU, unmatched true parts score 0, extra ids are ignored, ``miou`` averages the parts present in the set
    (background too when ``ignore_background=False``).
    """
    return part_iou_from_confusion(part_confusion(pred, truth, num_ids, num_parts), ignore_background)


def class_part_iou(conf: np.ndarray, labels: Ids, class_names: list[str], part_names: list[str]) -> dict:
    """Part IoU of a set of several object classes, from its per-image confusion ``[B, N, P + 1]``.

    A part learner's N ids are shared by all classes (the id that is a car's wheel may be a person's head),
    so the headline ``miou`` matches ids to parts **per object class** (images of label ``k`` only, the
    protocol of :func:`part_iou_from_confusion` on them: parts the class never shows are left out) and
    averages the classes' mIoUs; ``per_image_miou`` likewise. ``miou_global`` is one matching over the whole
    set, which asks an id to mean the same part in every class. JSON-ready floats (NaN -> None)."""
    conf, labels = np.asarray(conf), np.asarray(labels)
    if labels.shape != conf.shape[:1]:
        raise ValueError(f"labels: expected one per image ({conf.shape[0]}), got shape {labels.shape}")
    if conf.shape[2] != len(part_names):
        raise ValueError(f"part_names: {len(part_names)} names for {conf.shape[2]} true classes (background first)")
    per_class, per_image, per_part = {}, [], {}
    for k, name in enumerate(class_names):
        sel = labels == k
        if not sel.any():
            continue
        res = part_iou_from_confusion(conf[sel])
        per_class[name] = res.miou
        per_image.append(res.per_image_miou)
        for j in np.flatnonzero(~np.isnan(res.per_part[1:])) + 1:
            per_part.setdefault(part_names[j], []).append(res.per_part[j])
    if not per_class:
        raise ValueError("labels: no image of any class in class_names")
    glob = part_iou_from_confusion(conf)

    def num(x: float):
        return None if np.isnan(x) else round(float(x), 6)

    return {
        "miou": num(np.nanmean(list(per_class.values()))),
        "per_image_miou": num(np.nanmean(per_image)),
        "miou_global": num(glob.miou),
        "per_class": {k: num(v) for k, v in per_class.items()},
        "per_part": {k: num(np.mean(v)) for k, v in sorted(per_part.items(), key=lambda kv: part_names.index(kv[0]))},
    }


def upsample_ids(ids: torch.Tensor, size: int) -> torch.Tensor:
    """Patch ids ``[B, g, g]`` -> pixel ids ``[B, size, size]``, each patch's id over its pixels (nearest)."""
    return F.interpolate(ids[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def patch_majority(truth: torch.Tensor, grid: int, num_classes: int) -> torch.Tensor:
    """The most frequent true class of each patch ``[B, grid, grid]`` (ties: the lowest id): the best any
    one-id-per-patch map can do, a ceiling for the part maps on that grid."""
    onehot = F.one_hot(truth.long(), num_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, grid).argmax(1)
