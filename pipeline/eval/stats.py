"""Seed statistics for the report: mean ± sd of a row, and the paired comparison of two variants.

Runs of two variants with the same seed share their initialisation and data order (pretraining and
probing seed both from the run's seed), so the fair comparison is per seed: ``d_s = a_s - b_s`` over the
seeds both have, a 95% confidence interval ``mean(d) ± t(0.975, n - 1) · sd(d) / √n``, and a verdict
only when that interval excludes 0. With no true difference this calls a win or a loss 5% of the time
whatever the number of seeds (the rule it replaces, |difference of means| > 2 unpaired standard
errors, did so about 11% of the time at 3 seeds, and ignored that the seeds are shared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Hashable, Mapping, Optional, Sequence

__all__ = ["Comparison", "mean_sd", "paired_comparison", "t_quantile", "t_cdf", "WIN", "LOSS", "NO_DIFFERENCE",
           "ONE_SEED", "NO_COMMON_SEED"]  # fmt: skip

WIN, LOSS, NO_DIFFERENCE = "win", "loss", "no difference detected"
ONE_SEED, NO_COMMON_SEED = "one seed: no verdict", "no common seed: no verdict"


def mean_sd(values: Sequence[float]) -> tuple[float, Optional[float], int]:
    """``(mean, sample standard deviation or None for one value, n)`` of a row's per-seed values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_sd of no values")
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, sd, n


# scipy is not a dependency of the pipeline, and the report needs only this one quantile: the Student-t
# CDF from the regularised incomplete beta function (continued fraction, Numerical Recipes' betacf),
# inverted by bisection.
def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _beta_inc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _beta_inc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (e.g. ``t_quantile(0.975, 2)`` =
    4.3027), to about 1e-12 relative."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Comparison:
    """``a - b`` paired by seed. ``ci_low``/``ci_high``/``sign`` are None below two common seeds."""

    n: int
    mean: Optional[float]  # mean difference (None without a common seed)
    sd: Optional[float]  # sd of the per-seed differences
    ci_low: Optional[float]
    ci_high: Optional[float]
    verdict: str  # WIN, LOSS, NO_DIFFERENCE, ONE_SEED or NO_COMMON_SEED
    seeds: tuple

    @property
    def sign(self) -> Optional[int]:
        """+1 win, -1 loss, 0 no difference detected, None without a verdict."""
        return {WIN: 1, LOSS: -1, NO_DIFFERENCE: 0}.get(self.verdict)

    def numbers(self, digits: int = 6) -> dict:
        """Numbers only (``dvc metrics diff``): mean, n, and with two or more seeds ci_low, ci_high and the
        verdict as +1/0/-1; nothing without a common seed."""
        out: dict = {}
        if self.mean is None:
            return out
        out["mean"], out["n"] = round(self.mean, digits), self.n
        if self.sign is not None:
            out.update(ci_low=round(self.ci_low, digits), ci_high=round(self.ci_high, digits), verdict=self.sign)
        return out


def paired_comparison(a: Mapping[Hashable, float], b: Mapping[Hashable, float], level: float = 0.95) -> Comparison:
    """``a - b`` over the seeds present in both (``{seed: value}``): mean difference, its ``level``
    confidence interval (Student t, n - 1 degrees of freedom) and the verdict: a win when the interval
    lies above 0, a loss below, else no difference detected; one common seed gives no verdict."""
    seeds = tuple(s for s in a if s in b)
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    if not diffs:
        return Comparison(0, None, None, None, None, NO_COMMON_SEED, seeds)
    mean, sd, n = mean_sd(diffs)
    if sd is None:
        return Comparison(1, mean, None, None, None, ONE_SEED, seeds)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = WIN if low > 0 else LOSS if high < 0 else NO_DIFFERENCE
    return Comparison(n, mean, sd, low, high, verdict, seeds)
