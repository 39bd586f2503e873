"""The report's seed statistics: the Student-t quantile, mean ± sd, and the paired verdict's error rates."""

import numpy as np
import pytest

from pipeline.eval.stats import LOSS, NO_DIFFERENCE, ONE_SEED, WIN, mean_sd, paired_comparison, t_quantile

EXPERIMENTS = 10_000


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062047), (2, 4.30265273), (4, 2.77644511), (10, 2.22813885),
                                              (30, 2.04227246)])  # fmt: skip
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-8)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=5e-8)


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert mean_sd([0.7]) == (0.7, None, 1)


def test_paired_comparison_by_hand():
    # differences 0.3, 0.4, 0.5 (seed 3 only in a: left out): mean 0.4, sd 0.1, half-width t(0.975, 2) 0.1 / sqrt 3
    c = paired_comparison({0: 0.8, 1: 0.9, 2: 1.0, 3: 0.9}, {2: 0.5, 0: 0.5, 1: 0.5})
    assert (c.n, c.seeds, c.verdict, c.sign) == (3, (0, 1, 2), WIN, 1)
    half = 4.30265273 * 0.1 / 3**0.5
    assert (c.mean, c.ci_low, c.ci_high) == pytest.approx((0.4, 0.4 - half, 0.4 + half))
    assert paired_comparison({0: 0.5, 1: 0.5, 2: 0.5}, {0: 0.8, 1: 0.9, 2: 1.0}).verdict == LOSS
    assert paired_comparison({0: 0.6, 1: 0.5, 2: 0.55}, {0: 0.5, 1: 0.6, 2: 0.55}).verdict == NO_DIFFERENCE
    assert c.numbers() == pytest.approx({"mean": 0.4, "n": 3, "ci_low": 0.4 - half, "ci_high": 0.4 + half,
                                         "verdict": 1}, abs=1e-6)  # fmt: skip


def test_one_seed_gives_no_verdict():
    c = paired_comparison({0: 0.9}, {0: 0.1, 1: 0.2})
    assert (c.n, c.verdict, c.sign, c.ci_low) == (1, ONE_SEED, None, None)
    assert c.numbers() == {"mean": pytest.approx(0.8), "n": 1}  # no interval, no verdict
    assert paired_comparison({0: 0.9}, {1: 0.1}).numbers() == {}


def verdict_rate(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the experiments (rows: seeds) where the paired comparison calls a win or a loss."""
    calls = [paired_comparison(dict(enumerate(x)), dict(enumerate(y))).sign for x, y in zip(a.tolist(), b.tolist())]
    return sum(s in (1, -1) for s in calls) / len(calls)


def unpaired_two_se_rate(a: np.ndarray, b: np.ndarray) -> float:
    """The rule the paired comparison replaced: |mean(a) - mean(b)| > 2 unpaired standard errors."""
    se = np.sqrt(a.var(1, ddof=1) / a.shape[1] + b.var(1, ddof=1) / b.shape[1])
    return float(np.mean(np.abs(a.mean(1) - b.mean(1)) > 2 * se))


def seeded_runs(rng: np.random.Generator, seeds: int, effect: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two variants' metric over ``seeds`` seeds in each of the experiments: a per-seed component both
    runs of a seed share (initialisation, data order; sd 1) plus each run's own noise (sd 0.5)."""
    shared = rng.normal(0.0, 1.0, (EXPERIMENTS, seeds))
    return shared + rng.normal(0.0, 0.5, shared.shape) + effect, shared + rng.normal(0.0, 0.5, shared.shape)


def test_no_true_effect_gives_a_verdict_about_5_percent_of_the_time():
    rng = np.random.default_rng(0)
    a, b = seeded_runs(rng, 3)
    assert 0.03 <= verdict_rate(a, b) <= 0.07  # measured: 4.55%
    # contrast: the old unpaired 2-SE rule on independent runs (no shared seed component) calls a winner
    # about 11% of the time at 3 seeds (measured 11.9%); with the shared component it turns timid instead
    independent = rng.normal(0.0, 1.0, (2, EXPERIMENTS, 3))
    assert 0.09 <= unpaired_two_se_rate(*independent) <= 0.14


def test_a_real_effect_is_detected_most_of_the_time():
    rng = np.random.default_rng(1)
    sd_diff = np.sqrt(2) * 0.5  # sd of a paired difference: the shared component cancels
    a, b = seeded_runs(rng, 5, effect=1.5 * sd_diff)
    # power of the paired t test at delta = 1.5 sqrt(5), 4 degrees of freedom: about 0.72 (measured 0.71);
    # the old unpaired rule, drowned by the shared seed component, found it about 31% of the time
    assert verdict_rate(a, b) > 0.6
    assert unpaired_two_se_rate(a, b) < 0.45
