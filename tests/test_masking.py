"""Masking properties: the semantic masking of docs/method.md, on random part maps with fixed seeds."""

import math

import pytest
import torch

from pipeline.mae.masking import curriculum_alpha, len_keep, masks_per_part, random_masking, semantic_masking

K = 6


def part_maps(b=64, length=64, k=K, seed=0, empty=()):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, k, (b, length), generator=g)
    for part in empty:  # make some parts empty by relabelling them
        ids[ids == part] = (part + 1) % k
    return ids


def masked_per_part(ids, mask, k=K):
    out = torch.zeros(ids.shape[0], k)
    return out.scatter_add_(1, ids, mask)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("ratio", [0.75, 0.6, 0.5])
def test_exact_visible_count_and_consistent_indices(alpha, ratio):
    ids = part_maps(length=49)
    m = semantic_masking(ids, ratio, alpha, K, torch.Generator().manual_seed(1))
    keep = len_keep(49, ratio)
    assert m.len_keep == keep
    assert torch.equal((m.mask == 0).sum(1), torch.full((ids.shape[0],), keep))
    # MAE's contract: ids_restore inverts ids_shuffle, and the first len_keep of ids_shuffle are visible
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), torch.arange(49).expand_as(ids))
    visible = torch.zeros_like(m.mask).scatter_(1, m.ids_shuffle[:, :keep], 1.0)
    assert torch.equal(visible, 1 - m.mask)


def test_alpha_zero_masks_the_same_share_of_every_part():
    ids = part_maps()
    g = torch.Generator().manual_seed(2)
    mask = semantic_masking(ids, 0.75, 0.0, K, g).mask
    counts = masked_per_part(ids, torch.ones_like(mask))
    target = torch.round(0.75 * counts)
    got = masked_per_part(ids, mask)
    # only the global rounding correction moves patches: |sum target - masked| per image, all one way
    correction = target.sum(1) - mask.sum(1)
    assert torch.equal((target - got).abs().sum(1), correction.abs())
    assert torch.all((target - got) * correction.sign().unsqueeze(1) >= 0)
    assert correction.abs().max() <= K / 2


def test_alpha_one_masks_whole_parts_with_at_most_one_partial():
    ids = part_maps()
    mask = semantic_masking(ids, 0.75, 1.0, K, torch.Generator().manual_seed(3)).mask
    counts = masked_per_part(ids, torch.ones_like(mask))
    got = masked_per_part(ids, mask)
    partial = ((got > 0) & (got < counts)).sum(1)
    # the budget L*r = 48 is an integer here, so the crossing part is the only partial one
    assert partial.max() <= 1
    whole = (got == counts) & (counts > 0)
    assert whole.sum(1).min() >= 1


def test_blend_follows_the_formula():
    ids = part_maps(b=32)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    m_half, counts = masks_per_part(ids, K, 0.75, 0.5, g1)
    m_one, _ = masks_per_part(ids, K, 0.75, 1.0, g2)  # same random part order -> the same m2
    m2 = m_one
    assert torch.equal(m_half, torch.round(0.5 * torch.round(0.75 * counts) + 0.5 * m2))
    # m2: whole parts in a random order until L*r, then a partial one
    assert torch.equal(m2.sum(1), torch.full((32,), 48.0))
    assert torch.all(m2 <= counts)


def test_blend_on_hand_computed_counts():
    """Part sizes [20, 12, 16, 16, 0, 0] of 64 patches, r = 0.75 (48 masked), the random part order 1, 2, 0, 3
    fixed by the noise: m1 = round(0.75 a) = [15, 9, 12, 12, 0, 0]; m2 masks parts 1, 2, 0 whole (12 + 16 + 20
    = 48) and none of part 3 = [20, 12, 16, 0, 0, 0]; alpha = 0.5: round([17.5, 10.5, 14, 6, 0, 0]), halves
    to even = [18, 10, 14, 6, 0, 0]."""
    ids = torch.tensor([0] * 20 + [1] * 12 + [2] * 16 + [3] * 16)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    noise = torch.tensor([[0.3, 0.1, 0.2, 0.4, 0.5, 0.6]])
    expected = {0.0: [15, 9, 12, 12, 0, 0], 1.0: [20, 12, 16, 0, 0, 0], 0.5: [18, 10, 14, 6, 0, 0]}
    for alpha, m in expected.items():
        got, counts = masks_per_part(ids[None], K, 0.75, alpha, noise=noise)
        assert got[0].tolist() == m and counts[0].tolist() == [20, 12, 16, 16, 0, 0], alpha


def test_empty_parts_are_never_masked_and_cost_nothing():
    ids = part_maps(empty=(2, 4))
    m, counts = masks_per_part(ids, K, 0.75, 0.7, torch.Generator().manual_seed(5))
    assert torch.all(counts[:, [2, 4]] == 0) and torch.all(m[:, [2, 4]] == 0)
    mask = semantic_masking(ids, 0.75, 0.7, K, torch.Generator().manual_seed(5)).mask
    assert torch.equal((mask == 0).sum(1), torch.full((ids.shape[0],), 16))


def test_same_generator_same_mask_other_seed_other_mask():
    ids = part_maps()
    a = semantic_masking(ids, 0.75, 0.4, K, torch.Generator().manual_seed(6))
    b = semantic_masking(ids, 0.75, 0.4, K, torch.Generator().manual_seed(6))
    c = semantic_masking(ids, 0.75, 0.4, K, torch.Generator().manual_seed(7))
    assert torch.equal(a.ids_shuffle, b.ids_shuffle) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)


def test_position_inside_a_part_is_uniform():
    """Chi-square on how often each patch of a fixed part map is masked at alpha=0 (fixed seed)."""
    torch.manual_seed(0)
    ids = part_maps(b=1, length=64, seed=8).expand(4000, 64).contiguous()
    mask = semantic_masking(ids, 0.75, 0.0, K, torch.Generator().manual_seed(9)).mask
    freq = mask.sum(0)
    for part in range(K):
        cells = freq[ids[0] == part]
        if len(cells) < 2:
            continue
        expected = cells.mean()
        chi2 = float(((cells - expected) ** 2 / expected).sum())
        dof = len(cells) - 1
        # p < 1e-4 cut-off (Wilson-Hilferty); a biased choice (e.g. always the first patches) is far above
        z = ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
        assert z < 3.72, (part, chi2, dof)


def test_random_masking_is_uniform_and_exact():
    m = random_masking(512, 64, 0.75, torch.Generator().manual_seed(10))
    assert torch.equal((m.mask == 0).sum(1), torch.full((512,), 16))
    freq = m.mask.mean(0)
    assert float((freq - 0.75).abs().max()) < 0.08


def test_curriculum_schedules():
    assert curriculum_alpha(0.0, "curriculum") == 0.0
    assert curriculum_alpha(0.5, "curriculum", gamma=2) == 0.25
    assert curriculum_alpha(1.0, "curriculum") == 1.0
    assert curriculum_alpha(0.5, "reversed", gamma=2) == 0.75
    assert curriculum_alpha(0.3, "fixed", alpha=0.4) == 0.4
    assert curriculum_alpha(1.7, "curriculum") == 1.0  # clamped
