"""MAE masking: plain random masking, SemMAE's semantic-guided masking with its curriculum, and the
compared strategies: BEiT's block masking and AttMask's attention-guided masking.

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

Every strategy takes its randomness from the sample's own ``noise`` row (``noise_size(L, K)`` uniforms
drawn by the loader), so the same noise gives the same mask however the batch is split over ranks:

- random: ``noise[:L]`` orders the patches;
- semantic: ``noise[:K]`` orders the parts, ``noise[K:K+L]`` picks each part's subset, ``noise[K+L:]``
  settles the rounding;
- block (:func:`block_flags` in the loader, then :func:`block_masking`): ``noise[L:L+4]`` seeds BEiT's
  sequential block loop, ``noise[:L]`` settles the images where BEiT stops short of the target;
- attention (:func:`attention_masking`): ``noise[:L]`` breaks ties in the attention, ``noise[L:2L]``
  picks AttMask-Hint's revealed patches.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch

__all__ = ["Masking", "len_keep", "noise_size", "random_masking", "semantic_masking", "masks_per_part", "curriculum_alpha",
           "block_flags", "block_flags_batch", "block_masking", "attention_masking"]  # fmt: skip


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


# --- BEiT's block masking (Bao et al. 2021, masking_generator.py MaskingGenerator) -------------------------------

BLOCK_SEED_VALUES = 4  # noise[L : L + 4] seed a block mask's generator
Block = tuple[int, int, int, int]  # a placed rectangle: top, left, h, w


def block_flags(noise: np.ndarray, grid: int, mask_ratio: float, min_patches: int = 16, min_aspect: float = 0.3,
                *, return_blocks: bool = False) -> np.ndarray | tuple[np.ndarray, list[Block]]:  # fmt: skip
    """BEiT's blockwise mask of a ``grid x grid`` image: ``bool [grid*grid]``, row-major, True = masked.

    BEiT's ``MaskingGenerator`` exactly, with ``num_masking = L - len_keep(L, mask_ratio)`` and
    ``max_num_patches = num_masking`` (BEiT's default): while fewer than ``num_masking`` are masked, up to
    10 attempts place one rectangle of area ``uniform(min_patches, limit)`` (``limit`` = patches still to
    mask) and aspect ratio log-uniform in ``[min_aspect, 1/min_aspect]``, ``h = round(sqrt(area*aspect))``,
    ``w = round(sqrt(area/aspect))`` (half-to-even, Python's ``round`` as in BEiT), kept when ``h, w < grid``
    and it masks between 1 and ``limit`` new patches; the loop stops when no attempt fits, so an image can
    end below the target (:func:`block_masking` then masks the rest at random). It never exceeds the target.

    The loop is sequential (a block's limit depends on what is already masked), so it runs per sample in
    the loader's workers, as BEiT does. Its random numbers come from a ``numpy.random.Generator`` seeded by
    the 24-bit integers of ``noise[L : L + 4]`` (``(noise * 2**24).astype(int)``): an unbounded stream that
    is still a pure function of the sample's noise row (``noise[:L]`` is left for :func:`block_masking`'s
    tie-break). ``return_blocks=True`` also returns the placed rectangles ``[(top, left, h, w), ...]``."""
    length = grid * grid
    if noise.ndim != 1 or noise.shape[0] < length + BLOCK_SEED_VALUES:
        raise ValueError(f"block_flags: noise has shape {noise.shape}, needs one row of >= L + {BLOCK_SEED_VALUES} = "
                         f"{length + BLOCK_SEED_VALUES} uniforms for a {grid}x{grid} grid (see noise_size)")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"block_flags: min_aspect={min_aspect} must be in (0, 1]")
    seed = (np.asarray(noise[length : length + BLOCK_SEED_VALUES], dtype=np.float64) * (1 << 24)).astype(np.int64)
    rng = np.random.default_rng(seed.tolist())
    num_masking = length - len_keep(length, mask_ratio)
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    mask = np.zeros((grid, grid), dtype=bool)
    blocks: list[Block] = []

    def place(limit: int) -> int:  # BEiT's _mask
        delta = 0
        for _ in range(10):
            area = min_patches + (limit - min_patches) * rng.random()  # random.uniform(a, b), also for a > b
            aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < grid and h < grid:
                top, left = int(rng.integers(0, grid - h, endpoint=True)), int(rng.integers(0, grid - w, endpoint=True))
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= limit:
                    mask[top : top + h, left : left + w] = True
                    blocks.append((top, left, h, w))
                    delta += new
            if delta > 0:
                break
        return delta

    count = 0
    while count < num_masking:
        delta = place(num_masking - count)  # min(num_masking - count, max_num_patches = num_masking)
        if delta == 0:
            break
        count += delta
    flags = mask.reshape(-1)
    return (flags, blocks) if return_blocks else flags


def block_flags_batch(noise: torch.Tensor, grid: int, mask_ratio: float, min_patches: int = 16,
                      min_aspect: float = 0.3) -> torch.Tensor:  # fmt: skip
    """:func:`block_flags` of every row of ``noise [B, >= L + 4]``: ``bool [B, L]`` on the noise's device
    (a Python loop over images, for figures and tests; training calls :func:`block_flags` in the loader)."""
    rows = noise.detach().cpu().numpy()
    flags = np.stack([block_flags(row, grid, mask_ratio, min_patches, min_aspect) for row in rows])
    return torch.from_numpy(flags).to(noise.device)


def block_masking(flags: torch.Tensor, mask_ratio: float, noise: torch.Tensor) -> Masking:
    """BEiT's block masks ``flags [B, L]`` (bool/uint8/float, 1 = masked by :func:`block_flags`) settled to
    exactly ``len_keep`` visible patches, batched on the device: sort by ``flags + noise[:, :L]`` (unflagged
    patches first in random order, then flagged ones), keep the first ``len_keep``. BEiT never masks more
    than ``L - len_keep``, so every flagged patch stays masked; an image where BEiT stopped short gets its
    remaining patches masked uniformly at random among the unflagged ones."""
    b, length = flags.shape
    if noise.shape[0] != b or noise.shape[1] < length:
        raise ValueError(f"block_masking: noise has shape {tuple(noise.shape)}, needs [{b}, >= {length}]")
    keep = len_keep(length, mask_ratio)
    flagged = (flags != 0).to(noise.dtype)
    too_many = flagged.sum(1) > length - keep
    if bool(too_many.any()):
        row = int(too_many.nonzero()[0, 0])
        raise ValueError(f"block_masking: row {row} has {int(flagged[row].sum())} flagged patches, more than the "
                         f"{length - keep} masked at mask_ratio={mask_ratio}: flags must come from block_flags at "
                         "the same grid and mask_ratio")  # fmt: skip
    return _from_order(torch.argsort(flagged + noise[:, :length], dim=1), keep)


# --- AttMask's attention-guided masking (Kakogeorgiou et al., ECCV 2022) ----------------------------------------

ATTENTION_MODES = ("high", "low", "hint")


def attention_masking(attention: torch.Tensor, mask_ratio: float, mode: str, hint_share: float,
                      noise: torch.Tensor) -> Masking:  # fmt: skip
    """AttMask's masking by ``attention [B, L]`` (the teacher's CLS attention per patch), batched on its device.

    - ``high``: mask the ``L - len_keep`` most attended patches (AttMask-High);
    - ``low``: mask the ``L - len_keep`` least attended (AttMask-Low);
    - ``hint`` (AttMask-Hint, the AttMask code's default): the pool is the ``int(hint_share * L)`` most
      attended patches (their ``show_max``); ``int(hint_share * mask_ratio * L)`` of the pool, a uniformly
      random subset, stay visible as hints, and the masked set is the most attended patches except the
      revealed ones. Adaptation: AttMask masks the top ``mask_ratio`` share minus the hints (a count that
      varies); here the next most attended patches are masked instead, so exactly ``len_keep`` stay visible
      as in every other strategy (at L=196, r=0.75, share 0.1: 14 of the top 19 revealed, 147 masked).

    Ties in the attention (rule): patches are ranked by attention (descending for high/hint, ascending for
    low) and, among equal attention, the patch with the larger ``noise[:, :L]`` is masked first.
    ``noise [B, >= 2L]``: ``noise[:, :L]`` breaks ties, ``noise[:, L:2L]`` picks the revealed hints (the
    pool patches with the smallest of these values)."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention_masking: unknown mode {mode!r}: high, low or hint")
    if not 0 <= hint_share < 1:
        raise ValueError(f"attention_masking: hint_share={hint_share} must be in [0, 1)")
    b, length = attention.shape
    if noise.shape[0] != b or noise.shape[1] < 2 * length:
        raise ValueError(f"attention_masking: noise has shape {tuple(noise.shape)}, needs [{b}, >= 2L = {2 * length}]")
    keep = len_keep(length, mask_ratio)
    score = attention.detach() if mode != "low" else -attention.detach()
    # The ranking (most to be masked first) by two sorts: noise descending, then a stable sort by score
    # descending, so equal scores keep the noise order — exact, unlike a float key score + eps * noise.
    by_noise = torch.argsort(noise[:, :length], dim=1, descending=True)
    by_score = torch.sort(torch.gather(score, 1, by_noise), stable=True, dim=1, descending=True)[1]
    order = torch.gather(by_noise, 1, by_score)
    if mode != "hint":
        return _from_order(order.flip(1), keep)  # the least to be masked first: the first len_keep stay visible
    pool, reveal = int(hint_share * length), int(hint_share * mask_ratio * length)
    if reveal > keep:
        raise ValueError(f"attention_masking: hint_share={hint_share} reveals {reveal} patches, more than the {keep} "
                         f"visible at mask_ratio={mask_ratio}: lower hint_share")  # fmt: skip
    # Ranking positions 0..L-1 (0 = most attended); the revealed ones are the pool positions whose patches
    # have the smallest noise[:, L:2L]. Keep-first key: revealed (-1), then the least attended (L-1-j).
    key = (length - 1 - torch.arange(length, device=order.device)).expand(b, length).clone()
    if reveal > 0:
        pool_noise = torch.gather(noise[:, length : 2 * length], 1, order[:, :pool])
        key.scatter_(1, torch.argsort(pool_noise, dim=1)[:, :reveal], -1)
    return _from_order(torch.gather(order, 1, torch.argsort(key, dim=1, stable=True)), keep)
