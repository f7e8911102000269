"""Seed statistics: mean and spread over seeds, and paired differences with a 95% t-interval.

Schemes trained under the same seed share their data order and their initial random stream, so
the difference of two schemes' losses is compared seed by seed (a paired t-interval): the seed's
own luck cancels, and a smaller effect can be told from noise than with two separate means.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

CONFIDENCE = 0.95


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function for a whole number of degrees of freedom, in closed
    form (Abramowitz and Stegun 26.7.3 and 26.7.4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a whole number >= 1, not {df}")
    theta = math.atan2(abs(t), math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):  # cos, 2/3 cos^3, (2*4)/(3*5) cos^5, ...
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        inside = 2 / math.pi * (theta + s * total)
    else:
        total, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):  # 1, 1/2 cos^2, (1*3)/(2*4) cos^4, ...
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        inside = s * total
    # ``inside`` is P(|T| <= |t|)
    return 0.5 + math.copysign(inside / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (bisection on ``t_cdf``)."""
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), not {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


@dataclass
class Spread:
    """Mean and sample standard deviation of n values (std None for one value)."""

    mean: float | None
    std: float | None
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def spread(values: list[float]) -> Spread:
    n = len(values)
    if n == 0:
        return Spread(None, None, 0)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Spread(mean, std, n)


@dataclass
class Interval(Spread):
    """A mean difference with its two-sided confidence interval (None below two values)."""

    low: float | None = None
    high: float | None = None
    confidence: float = CONFIDENCE

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def paired_interval(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of a[i] - b[i] with its t-interval; a and b are paired by position (by seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, not {len(a)} and {len(b)}")
    s = spread([x - y for x, y in zip(a, b)])
    if s.n < 2:
        return Interval(s.mean, s.std, s.n, confidence=confidence)
    half = t_quantile(0.5 + confidence / 2, s.n - 1) * s.std / math.sqrt(s.n)
    return Interval(s.mean, s.std, s.n, s.mean - half, s.mean + half, confidence)


SEEDS_LIMIT = 1000


def seeds_needed(mean: float | None, std: float | None, confidence: float = CONFIDENCE,
                 limit: int = SEEDS_LIMIT) -> int | None:
    """The fewest seeds n whose paired interval would exclude 0 if the mean difference and its
    standard deviation stayed as measured: the least n with t(n-1) * std / sqrt(n) < |mean|.
    It tells "too few seeds" from "no effect to see". None: no mean or spread to go on, a mean
    of 0, or more than ``limit`` seeds."""
    if mean is None or std is None or mean == 0:
        return None
    if std == 0:
        return 2

    def enough(n: int) -> bool:
        return t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n) < abs(mean)

    if not enough(limit):
        return None
    lo, hi = 2, limit  # t(n-1) / sqrt(n) falls as n grows: bisect for the first n enough
    while lo < hi:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
