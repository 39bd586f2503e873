"""MAE masking: plain random masking and SemMAE's semantic-guided masking with its curriculum.

Both return MAE's machinery unchanged: ``ids_shuffle [B, L]`` (kept patches first),
``ids_restore [B, L]`` (its inverse permutation) and ``mask [B, L]`` (0 keep, 1 remove), with exactly
``len_keep = int(L * (1 - mask_ratio))`` visible patches per image. Everything is batched tensor
work on the input's device: no Python loop over images or parts.

Semantic-guided masking (docs/method.md): for an image whose patches belong to parts with sizes
``a_k``,

- ``m1_k = round(r * a_k)``: the same share inside every part (alpha = 0, intra-part patterns);
- ``m2_k = min(a_k, max(0, L*r - sum of a_j before k))`` in a random part order: whole parts until the
  budget is spent, the crossing part partially (alpha = 1, inter-part relations);
- ``m_k = round((1 - alpha) * m1_k + alpha * m2_k)`` patches of part k, a uniformly random subset;
- rounding leaves a surplus or deficit against ``L - len_keep``: it is settled at random, by sorting
  (flag + noise) as the authors' code does — unflagged patches in random order, then flagged ones.

``round`` is round-half-to-even (``torch.round``), like Python's ``round`` in the authors' code.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch

__all__ = ["Masking", "len_keep", "noise_size", "random_masking", "semantic_masking", "masks_per_part", "curriculum_alpha"]


class Masking(NamedTuple):
    ids_shuffle: torch.Tensor  # [B, L] int64, the len_keep kept patches first
    ids_restore: torch.Tensor  # [B, L] int64, argsort of ids_shuffle
    mask: torch.Tensor  # [B, L] float, 0 keep, 1 remove
    len_keep: int  # visible patches per image


def len_keep(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image, as MAE computes it: ``int(L * (1 - r))``."""
    return int(num_patches * (1 - mask_ratio))


def _from_order(ids_shuffle: torch.Tensor, keep: int) -> Masking:
    b, length = ids_shuffle.shape
    # the inverse permutation by a scatter (O(L)) rather than MAE's second argsort; same result
    ids_restore = torch.empty_like(ids_shuffle).scatter_(
        1, ids_shuffle, torch.arange(length, device=ids_shuffle.device).expand(b, length)
    )
    mask = torch.ones(ids_shuffle.shape, device=ids_shuffle.device)
    mask[:, :keep] = 0
    return Masking(ids_shuffle, ids_restore, torch.gather(mask, 1, ids_restore), keep)


def noise_size(num_patches: int, num_parts: int) -> int:
    """Uniform numbers per image that :func:`semantic_masking` consumes (random masking: the first L)."""
    return num_parts + 2 * num_patches


def random_masking(batch: int, num_patches: int, mask_ratio: float, generator: Optional[torch.Generator] = None,
                   device: torch.device | str = "cpu", noise: Optional[torch.Tensor] = None) -> Masking:  # fmt: skip
    """MAE's per-sample random masking (a uniformly random subset of ``L - len_keep`` patches).

    ``noise [B, >= L]`` (uniform in [0, 1), e.g. drawn by the loader) replaces the draw from ``generator``."""
    noise = torch.rand(batch, num_patches, generator=generator, device=device) if noise is None else noise[:, :num_patches]
    return _from_order(torch.argsort(noise, dim=1), len_keep(num_patches, mask_ratio))


def masks_per_part(part_ids: torch.Tensor, num_parts: int, mask_ratio: float, alpha: float | torch.Tensor,
                   generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(m [B, K], counts [B, K])``: how many patches of each part to mask, and the part sizes ``a_k``
    (``noise [B, K]``, uniform, orders the parts for m2; drawn from ``generator`` when not given)."""
    b, length = part_ids.shape
    counts = torch.zeros(b, num_parts, dtype=torch.float32, device=part_ids.device)
    counts.scatter_add_(1, part_ids, torch.ones(part_ids.shape, dtype=torch.float32, device=part_ids.device))
    m1 = torch.round(mask_ratio * counts)
    if noise is None:
        noise = torch.rand(b, num_parts, generator=generator, device=part_ids.device)
    order = torch.argsort(noise, dim=1)
    ordered = torch.gather(counts, 1, order)
    before = torch.cumsum(ordered, 1) - ordered  # patches of the parts earlier in the random order
    m2_ordered = torch.minimum(ordered, (length * mask_ratio - before).clamp(min=0))
    m2 = torch.empty_like(counts).scatter_(1, order, m2_ordered)
    return torch.round((1 - alpha) * m1 + alpha * m2), counts


def semantic_masking(part_ids: torch.Tensor, mask_ratio: float, alpha: float | torch.Tensor, num_parts: int,
                     generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None) -> Masking:  # fmt: skip
    """SemMAE's masking of ``part_ids [B, L]`` (int, values in ``[0, num_parts)``) at curriculum ``alpha``.

    Its randomness is ``noise [B, K + 2L]`` (uniform in [0, 1), see :func:`noise_size`) when given —
    the loader draws it per sample, so a sample's mask does not depend on how the batch is split
    over ranks — else it is drawn from ``generator``."""
    part_ids = part_ids.long()
    b, length = part_ids.shape
    device = part_ids.device
    if noise is None:
        noise = torch.rand(b, noise_size(length, num_parts), generator=generator, device=device)
    m, counts = masks_per_part(part_ids, num_parts, mask_ratio, alpha, noise=noise[:, :num_parts])
    # A uniformly random subset of m_k patches per part: sort by (part, noise); a patch is flagged when
    # its rank inside its part is below m_k. The key is an integer (part * 2^24 + 24 bits of noise):
    # a float key part + noise can round up to the next part's id and break the parts' contiguity.
    subset = noise[:, num_parts : num_parts + length]
    by_part = torch.argsort(part_ids * (1 << 24) + (subset * (1 << 24)).long(), dim=1)
    sorted_parts = torch.gather(part_ids, 1, by_part)
    starts = torch.cumsum(counts, 1) - counts  # first sorted position of each part
    rank = torch.arange(length, device=device).expand(b, length) - torch.gather(starts, 1, sorted_parts)
    flagged = (rank < torch.gather(m, 1, sorted_parts)).float()
    # Exactly len_keep visible: unflagged patches first (random order), then flagged ones (random order).
    score = flagged + noise[:, num_parts + length :]  # flagged + [0, 1): ties within a group only
    ids_shuffle = torch.gather(by_part, 1, torch.argsort(score, dim=1))
    return _from_order(ids_shuffle, len_keep(length, mask_ratio))


def curriculum_alpha(progress: float, schedule: Literal["curriculum", "reversed", "fixed"], gamma: float = 2.0,
                     alpha: float = 0.0) -> float:  # fmt: skip
    """alpha at training ``progress`` t/T in [0, 1]: ``(t/T)^gamma``, ``1 - (t/T)^gamma``, or the fixed ``alpha``."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "curriculum":
        return math.pow(progress, gamma)
    if schedule == "reversed":
        return 1.0 - math.pow(progress, gamma)
    if schedule == "fixed":
        return alpha
    raise ValueError(f"unknown schedule {schedule!r}: curriculum, reversed or fixed")
