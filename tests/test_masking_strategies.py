"""The compared masking strategies as published: BEiT's block masking and AttMask's attention-guided masking.

Block masking is checked against an independent reference written here from BEiT's ``MaskingGenerator``
with Python's ``random`` module (same algorithm, another generator): the distributions of block areas,
aspect ratios, blocks and masked patches per image agree (two-sample Kolmogorov-Smirnov statistic, written
here: scipy is not a dependency). Fixed seeds throughout, so every test is deterministic.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from pipeline.mae.masking import (attention_masking, block_flags, block_flags_batch, block_masking, len_keep,
                                  noise_size)  # fmt: skip

MASKS = 2000  # block masks per distribution sample
KS_C = 1.95  # two-sample KS critical coefficient at alpha = 0.001


def noise_rows(b: int, length: int, seed: int) -> np.ndarray:
    """The loader's per-sample noise: float32 uniforms in [0, 1), ``noise_size(L, 6)`` per row."""
    return np.random.default_rng(seed).random((b, noise_size(length, 6)), dtype=np.float32)


def beit_reference(rnd: random.Random, grid: int, num_masking: int, min_patches: int = 16, min_aspect: float = 0.3):
    """BEiT's MaskingGenerator (masking_generator.py) with max_num_patches = num_masking, as published, on
    Python's random module: ``(mask [grid, grid], blocks [(top, left, h, w)])``."""
    mask = np.zeros((grid, grid), dtype=int)
    blocks = []
    log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))

    def _mask(max_mask_patches):
        delta = 0
        for _attempt in range(10):
            target_area = rnd.uniform(min_patches, max_mask_patches)
            aspect_ratio = math.exp(rnd.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < grid and h < grid:
                top = rnd.randint(0, grid - h)
                left = rnd.randint(0, grid - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                    blocks.append((top, left, h, w))
                if delta > 0:
                    break
        return delta

    mask_count = 0
    while mask_count < num_masking:
        delta = _mask(min(num_masking - mask_count, num_masking))
        if delta == 0:
            break
        mask_count += delta
    return mask, blocks


def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    values = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, values, "right") / len(a) - np.searchsorted(b, values, "right") / len(b)).max())


def ks_critical(n: int, m: int) -> float:
    return KS_C * math.sqrt((n + m) / (n * m))


def summary(masks_and_blocks) -> dict[str, list[float]]:
    """Per-image statistics (first block: independent across images) and per-block statistics."""
    out = {"first_area": [], "first_log_aspect": [], "first_top": [], "first_left": [], "area": [], "log_aspect": [],
           "blocks": [], "masked": []}  # fmt: skip
    for mask, blocks in masks_and_blocks:
        out["first_top"].append(blocks[0][0])
        out["first_left"].append(blocks[0][1])
        out["first_area"].append(blocks[0][2] * blocks[0][3])
        out["first_log_aspect"].append(math.log(blocks[0][2] / blocks[0][3]))
        out["area"] += [h * w for _, _, h, w in blocks]
        out["log_aspect"] += [math.log(h / w) for _, _, h, w in blocks]
        out["blocks"].append(len(blocks))
        out["masked"].append(int(mask.sum()))
    return out


@pytest.fixture(scope="module")
def block_samples():
    """MASKS block masks at 14x14 / 0.75 from block_flags and from the reference."""
    grid, ratio = 14, 0.75
    length = grid * grid
    ours = [block_flags(row, grid, ratio, return_blocks=True) for row in noise_rows(MASKS, length, 0)]
    rnd = random.Random(1)
    ref = [beit_reference(rnd, grid, length - len_keep(length, ratio)) for _ in range(MASKS)]
    return ours, ref


def test_block_geometry_as_published(block_samples):
    """Every placed block: 1 <= h, w < grid; it masks 1..limit new patches (limit = still to mask); its
    h, w are the rounding of sqrt(area * aspect), sqrt(area / aspect) for some area in [min, limit] and
    aspect in [0.3, 1/0.3]; the masked count never exceeds the target; the flags are the blocks' union."""
    grid, target, min_patches, min_aspect = 14, 196 - 49, 16, 0.3
    for flags, blocks in block_samples[0]:
        covered = np.zeros((grid, grid), dtype=bool)
        for top, left, h, w in blocks:
            assert 1 <= h < grid and 1 <= w < grid, (h, w)
            assert 0 <= top <= grid - h and 0 <= left <= grid - w
            limit = target - int(covered.sum())
            new = h * w - int(covered[top : top + h, left : left + w].sum())
            assert 0 < new <= limit, (new, limit)
            # the aspect and area that rounded to (h, w) lie in these intervals; they must meet the drawn ranges
            assert (h - 0.5) / (w + 0.5) <= 1 / min_aspect and (h + 0.5) / (w - 0.5) >= min_aspect, (h, w)
            lo, hi = min(min_patches, limit), max(min_patches, limit)
            assert (h - 0.5) * (w - 0.5) <= hi and (h + 0.5) * (w + 0.5) >= lo, (h, w, limit)
            covered[top : top + h, left : left + w] = True
        assert flags.dtype == bool and flags.shape == (grid * grid,)
        assert np.array_equal(flags, covered.reshape(-1))
        assert flags.sum() <= target


@pytest.mark.parametrize("stat", ["first_area", "first_log_aspect", "first_top", "first_left", "area", "log_aspect",
                                  "blocks", "masked"])  # fmt: skip
def test_block_distribution_matches_the_reference(block_samples, stat):
    """Two-sample KS against BEiT's loop on Python's random. The per-block samples are dependent inside an
    image, so their critical value uses the number of images (conservative), not the number of blocks."""
    ours, ref = (summary(s)[stat] for s in block_samples)
    d = ks_statistic(ours, ref)
    assert d < ks_critical(MASKS, MASKS), (stat, d, ks_critical(MASKS, MASKS), np.mean(ours), np.mean(ref))


@pytest.mark.parametrize("grid", [14, 8])
def test_block_short_share_matches_the_reference(grid, record_property):
    """The share of images where BEiT stops below the target (no attempt fits), ours against the reference
    (two-proportion z < 4); recorded (pytest -rA / junit) and printed for the report."""
    length, ratio = grid * grid, 0.75
    target = length - len_keep(length, ratio)
    ours = np.array([block_flags(row, grid, ratio).sum() for row in noise_rows(MASKS, length, 2)])
    rnd = random.Random(3)
    ref = np.array([beit_reference(rnd, grid, target)[0].sum() for _ in range(MASKS)])
    assert ours.max() <= target and ref.max() <= target
    p_ours, p_ref = float((ours < target).mean()), float((ref < target).mean())
    pooled = (p_ours + p_ref) / 2
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * 2 / MASKS)
    print(f"\nblock {grid}x{grid} r={ratio}: short of {target} in {p_ours:.2%} (reference {p_ref:.2%}), "
          f"mean masked {ours.mean():.2f} (reference {ref.mean():.2f})")  # fmt: skip
    record_property(f"block_short_share_{grid}x{grid}", p_ours)
    assert abs(p_ours - p_ref) / se < 4, (p_ours, p_ref)


def test_block_flags_is_a_pure_function_of_its_seed_values():
    """Same noise -> same flags; only noise[L : L + 4] matters (noise[:L] is block_masking's tie-break)."""
    row = noise_rows(1, 196, 4)[0]
    a = block_flags(row, 14, 0.75)
    assert np.array_equal(a, block_flags(row.copy(), 14, 0.75))
    other = row.copy()
    other[:196] = np.random.default_rng(5).random(196, dtype=np.float32)
    other[200:] = 0.5
    assert np.array_equal(a, block_flags(other, 14, 0.75))
    other[196] = (other[196] + 0.5) % 1
    assert not np.array_equal(a, block_flags(other, 14, 0.75))
    with pytest.raises(ValueError, match="noise has shape"):
        block_flags(row[:199], 14, 0.75)


def test_block_masking_exact_and_keeps_beit_blocks_masked():
    length, ratio = 196, 0.75
    keep = len_keep(length, ratio)
    noise = torch.from_numpy(noise_rows(64, length, 6))
    flags = block_flags_batch(noise, 14, ratio)
    for as_type in (torch.bool, torch.uint8, torch.float32):
        m = block_masking(flags.to(as_type), ratio, noise)
        assert m.len_keep == keep
        assert torch.equal((m.mask == 0).sum(1), torch.full((64,), keep))
        assert torch.all(m.mask[flags] == 1)  # every patch BEiT masked stays masked
        assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), torch.arange(length).expand(64, length))
        visible = torch.zeros_like(m.mask).scatter_(1, m.ids_shuffle[:, :keep], 1.0)
        assert torch.equal(visible, 1 - m.mask)
    # the images BEiT left short: the extra masked patches are the unflagged ones with the largest noise[:L]
    short = flags.sum(1) < length - keep
    assert short.any()
    for i in short.nonzero()[:, 0].tolist():
        unflagged = (~flags[i]).nonzero()[:, 0]
        extra = length - keep - int(flags[i].sum())
        chosen = unflagged[torch.argsort(noise[i, unflagged], descending=True)[:extra]]
        assert torch.all(m.mask[i, chosen] == 1) and int(m.mask[i].sum()) == length - keep


def test_block_masking_depends_on_the_row_only():
    noise = torch.from_numpy(noise_rows(32, 196, 7))
    whole = block_masking(block_flags_batch(noise, 14, 0.75), 0.75, noise)
    halves = [block_masking(block_flags_batch(n, 14, 0.75), 0.75, n) for n in (noise[:16], noise[16:])]
    again = block_masking(block_flags_batch(noise.clone(), 14, 0.75), 0.75, noise.clone())
    for field in ("ids_shuffle", "ids_restore", "mask"):
        assert torch.equal(getattr(whole, field), torch.cat([getattr(h, field) for h in halves]))
        assert torch.equal(getattr(whole, field), getattr(again, field))


def test_block_masking_refuses_too_many_flags():
    noise = torch.rand(2, 196)
    flags = torch.zeros(2, 196, dtype=torch.bool)
    flags[1, :148] = True  # one more than the 147 masked at 0.75
    with pytest.raises(ValueError, match="row 1 has 148 flagged patches"):
        block_masking(flags, 0.75, noise)


# --- attention-guided masking ------------------------------------------------------------------------------------


def masked_sets(m) -> list[set[int]]:
    return [set(row.nonzero()[:, 0].tolist()) for row in m.mask]


def ranking(attention: torch.Tensor, noise: torch.Tensor, mode: str) -> list[list[int]]:
    """The documented rule, written out in Python: most-to-be-masked first = attention descending (ascending
    for low), equal attention -> larger noise[:L] first."""
    sign = -1 if mode == "low" else 1
    return [sorted(range(a.shape[0]), key=lambda i: (-sign * float(a[i]), -float(n[i]))) for a, n in zip(attention, noise)]


def check_exact(m, length: int, keep: int) -> None:
    b = m.mask.shape[0]
    assert m.len_keep == keep
    assert torch.equal((m.mask == 0).sum(1), torch.full((b,), keep))
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), torch.arange(length).expand(b, length))
    visible = torch.zeros_like(m.mask).scatter_(1, m.ids_shuffle[:, :keep], 1.0)
    assert torch.equal(visible, 1 - m.mask)


@pytest.mark.parametrize("mode", ["high", "low"])
def test_attention_high_low_mask_the_ranked_patches(mode):
    g = torch.Generator().manual_seed(8)
    length, ratio = 196, 0.75
    keep, masked = len_keep(length, ratio), length - len_keep(length, ratio)
    attention = torch.rand(16, length, generator=g).softmax(1)
    noise = torch.rand(16, 2 * length, generator=g)
    m = attention_masking(attention, ratio, mode, 0.1, noise)
    check_exact(m, length, keep)
    top = torch.topk(attention, masked, dim=1, largest=mode == "high").indices
    assert masked_sets(m) == [set(row.tolist()) for row in top]


@pytest.mark.parametrize("mode", ["high", "low"])
def test_attention_ties_follow_the_documented_rule(mode):
    """Attention on 4 levels (heavy ties): the masked set is exactly the rule's first L - len_keep."""
    g = torch.Generator().manual_seed(9)
    length, ratio = 64, 0.6
    attention = torch.randint(0, 4, (32, length), generator=g).float() / 4
    noise = torch.rand(32, 2 * length, generator=g)
    m = attention_masking(attention, ratio, mode, 0.1, noise)
    check_exact(m, length, len_keep(length, ratio))
    n = length - len_keep(length, ratio)
    assert masked_sets(m) == [set(r[:n]) for r in ranking(attention, noise[:, :length], mode)]


def test_attention_hint_reveals_from_the_top_pool_and_masks_the_next():
    """L=196, r=0.75, share 0.1: 14 of the top 19 revealed, the masked 147 are the top 161 minus those 14."""
    g = torch.Generator().manual_seed(10)
    length, ratio, share = 196, 0.75, 0.1
    keep, masked = len_keep(length, ratio), length - len_keep(length, ratio)
    pool, reveal = int(share * length), int(share * ratio * length)
    assert (pool, reveal) == (19, 14)
    attention = torch.rand(64, length, generator=g)
    noise = torch.rand(64, 2 * length, generator=g)
    m = attention_masking(attention, ratio, "hint", share, noise)
    check_exact(m, length, keep)
    for rank, got in zip(ranking(attention, noise[:, :length], "hint"), masked_sets(m)):
        revealed = set(rank[:pool]) - got
        assert len(revealed) == reveal
        assert got == set(rank[: masked + reveal]) - revealed  # the next most attended replace the hints


def test_attention_hint_reveals_a_uniform_subset_of_the_pool():
    """One attention map, 4000 noise rows: each of the 19 pool patches is revealed with probability 14/19
    (binomial, |z| < 4.5 per patch); nothing outside the pool is revealed."""
    g = torch.Generator().manual_seed(11)
    b, length = 4000, 196
    attention = torch.rand(1, length, generator=g).expand(b, length)
    m = attention_masking(attention, 0.75, "hint", 0.1, torch.rand(b, 2 * length, generator=g))
    order = torch.argsort(attention[0], descending=True)
    revealed = 1 - m.mask[:, order[:19]]
    p = 14 / 19
    z = (revealed.sum(0) - b * p) / math.sqrt(b * p * (1 - p))
    assert float(z.abs().max()) < 4.5, z
    assert torch.all(m.mask[:, order[19:161]] == 1)


@pytest.mark.parametrize("mode", ["high", "low", "hint"])
def test_attention_same_noise_same_mask_and_row_independence(mode):
    g = torch.Generator().manual_seed(12)
    attention = torch.rand(32, 196, generator=g)
    noise = torch.rand(32, 2 * 196, generator=g)
    whole = attention_masking(attention, 0.75, mode, 0.1, noise)
    again = attention_masking(attention.clone(), 0.75, mode, 0.1, noise.clone())
    halves = [attention_masking(attention[s], 0.75, mode, 0.1, noise[s]) for s in (slice(0, 16), slice(16, 32))]
    for field in ("ids_shuffle", "ids_restore", "mask"):
        assert torch.equal(getattr(whole, field), getattr(again, field))
        assert torch.equal(getattr(whole, field), torch.cat([getattr(h, field) for h in halves]))
    if mode == "hint":  # the hints move with noise[L:2L]
        other = noise.clone()
        other[:, 196:] = torch.rand(32, 196, generator=g)
        assert not torch.equal(whole.mask, attention_masking(attention, 0.75, mode, 0.1, other).mask)


def test_attention_refuses_bad_settings():
    attention, noise = torch.rand(2, 196), torch.rand(2, 392)
    with pytest.raises(ValueError, match="unknown mode 'top'"):
        attention_masking(attention, 0.75, "top", 0.1, noise)
    for share in (1.0, -0.1):
        with pytest.raises(ValueError, match=f"hint_share={share}"):
            attention_masking(attention, 0.75, "hint", share, noise)
    with pytest.raises(ValueError, match="more than the 19 visible"):  # 0.9 * 0.9 * 196 = 158 > 19
        attention_masking(attention, 0.9, "hint", 0.9, noise)
    with pytest.raises(ValueError, match="noise has shape"):
        attention_masking(attention, 0.75, "high", 0.1, noise[:, :196])
