"""The spread of a repeated figure: the median over repeats and an interval around it, by one rule.

The rule (DESIGN.md, "every figure carries its spread"): below :data:`BOOTSTRAP_FROM` values the interval is the
min-max of the values; from :data:`BOOTSTRAP_FROM` on it is a percentile-bootstrap 95% interval of the median:
exact (the bootstrap distribution of the median computed, not sampled) up to :data:`EXACT_UP_TO` values, drawn
with a fixed seed above; either way the same values always give the same interval. One value gives an interval of
no width (kind ``"single"``), which a reader shows as no interval at all.

A ratio of two repeated figures (efficiency: repeat i at N against repeat i at N0; a bench's cnnscale step against
the bare loop in the same round) is the interval of the per-pair ratios (:func:`pair_ratios`), not a ratio of two
medians: that is the ratio's own spread, and what stays of the machine's drift cancels within each pair.

Pure Python (no numpy, no torch): the report, the study and the bench use it. Cost: well under a millisecond for
an interval of 5 to 10 values, tens of ms at :data:`EXACT_UP_TO`; :data:`RESAMPLES` medians above it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "median", "finite_values", "bootstrap_interval", "interval", "pair_ratios", "ratio_interval",
           "BOOTSTRAP_FROM", "RESAMPLES", "SEED", "LEVEL", "KINDS", "EXACT_UP_TO"]

BOOTSTRAP_FROM = 5
"""From this many values on, the interval is a bootstrap 95% interval; below it, min-max."""
RESAMPLES = 2000
SEED = 0
EXACT_UP_TO = 100
"""Up to this many values the bootstrap distribution of the median is exact; above, :data:`RESAMPLES` draws."""
LEVEL = 0.95
KINDS = ("single", "min-max", "bootstrap95")
"""Interval kinds: one value (no interval), min-max (2 to 4 values), percentile bootstrap of the median (5 on)."""


@dataclass(frozen=True)
class Interval:
    """The median of ``n`` values and the interval [lo, hi] around it (``kind``: one of :data:`KINDS`)."""

    median: float
    lo: float
    hi: float
    n: int
    kind: str

    def contains(self, x: float) -> bool:
        """Whether ``x`` lies inside [lo, hi] (a ``single`` interval contains nothing: it has no spread to lie in)."""
        return self.kind != "single" and self.lo <= x <= self.hi


def finite_values(values: Sequence[object]) -> list[float]:
    """The values that are finite real numbers (bools, None, strings, NaN and infinities left out), as floats."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(v):
            out.append(float(v))
    return out


def median(values: Sequence[float]) -> float:
    """The median (the mean of the two middle values for an even count). ValueError for no values."""
    if not values:
        raise ValueError("median of no values")
    s = sorted(values)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _tail(combs: list[int], q: float, k: int) -> float:
    """P(Binomial(n, q) >= k), ``combs`` the binomial coefficients C(n, j) for j = 0..n."""
    n, q = len(combs) - 1, min(max(q, 0.0), 1.0)
    return sum(combs[j] * q**j * (1 - q) ** (n - j) for j in range(max(k, 0), n + 1))


def _median_distribution(values: Sequence[float]) -> list[tuple[float, float]]:
    """The exact bootstrap distribution of the median of ``values``: (median, probability), sorted by median.

    A resample draws n values with replacement; with distinct sorted values v_i drawn with probability p_i, the k-th
    order statistic obeys ``P(X_(k) <= v) = P(Binomial(n, P(draw <= v)) >= k)``. Odd n: the median is X_(m),
    m = (n + 1) / 2. Even n: (X_(m) + X_(m+1)) / 2, m = n / 2, from their joint law: X_(m) = v_a < X_(m+1) = v_b
    when m draws are at most v_a (one at least equal to it) and the other n - m at least v_b (one equal);
    X_(m) = X_(m+1) = v with probability ``P(X_(m+1) <= v) - P(X_(m) < v) + P(m draws below v, n - m above)``.
    Cost: O(d^2 + d n) for d distinct values (a millisecond for 10 values)."""
    n = len(values)
    s = sorted(values)
    vals = sorted(set(s))
    p = [s.count(v) / n for v in vals]
    below = [sum(p[:i]) for i in range(len(vals))]
    above = [max(1.0 - below[i] - p[i], 0.0) for i in range(len(vals))]
    out: dict[float, float] = {}
    combs = [math.comb(n, j) for j in range(n + 1)]
    if n % 2:
        m, prev = (n + 1) // 2, 0.0
        for i, v in enumerate(vals):
            cdf = _tail(combs, below[i] + p[i], m)
            out[v] = cdf - prev
            prev = cdf
        return sorted(out.items())
    m = n // 2
    highs = [(p[b] + above[b]) ** (n - m) - above[b] ** (n - m) for b in range(len(vals))]
    for a, va in enumerate(vals):
        same = (_tail(combs, below[a] + p[a], m + 1) - _tail(combs, below[a], m)
                + combs[m] * below[a] ** m * above[a] ** (n - m))
        out[va] = out.get(va, 0.0) + max(same, 0.0)
        low = combs[m] * ((below[a] + p[a]) ** m - below[a] ** m)
        for b in range(a + 1, len(vals)):
            key = (va + vals[b]) / 2
            out[key] = out.get(key, 0.0) + low * highs[b]
    return sorted(out.items())


def bootstrap_interval(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
                       seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` at ``level``.

    Up to :data:`EXACT_UP_TO` values the bootstrap distribution of the median is computed exactly (the limit of
    infinitely many resamples: no seed, no sampling noise, and fast); above, ``resamples`` medians are drawn with a
    fixed ``seed`` (reproducible)."""
    if not values:
        raise ValueError("bootstrap of no values")
    tail = (1 - level) / 2
    if len(values) <= EXACT_UP_TO:
        dist, cdf, lo, hi = _median_distribution(values), 0.0, None, None
        for v, prob in dist:
            cdf += prob
            if lo is None and cdf >= tail - 1e-12:
                lo = v
            if hi is None and cdf >= 1 - tail - 1e-12:
                hi = v
        return float(lo if lo is not None else dist[0][0]), float(hi if hi is not None else dist[-1][0])
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(median(rng.choices(values, k=n)) for _ in range(resamples))
    return _quantile(meds, tail), _quantile(meds, 1 - tail)


def interval(values: Sequence[object], seed: int = SEED) -> Interval | None:
    """The median and interval of the finite numbers among ``values`` by the module's rule; None when there are
    none."""
    vals = finite_values(values)
    if not vals:
        return None
    med = median(vals)
    if len(vals) == 1:
        return Interval(med, med, med, 1, "single")
    if len(vals) < BOOTSTRAP_FROM:
        return Interval(med, min(vals), max(vals), len(vals), "min-max")
    lo, hi = bootstrap_interval(vals, seed=seed)
    return Interval(med, min(lo, med), max(hi, med), len(vals), "bootstrap95")


def pair_ratios(num: Sequence[object], den: Sequence[object], scale: float = 1.0) -> list[float]:
    """``scale * num[i] / den[i]`` for each index where both are finite and ``den[i]`` is not zero (pairs by
    index: repeat i with repeat i; the longer list's extra entries have no partner and are left out)."""
    out = []
    for a, b in zip(num, den):
        fa, fb = finite_values([a]), finite_values([b])
        if fa and fb and fb[0] != 0:
            out.append(scale * fa[0] / fb[0])
    return out


def ratio_interval(num: Sequence[object], den: Sequence[object], scale: float = 1.0,
                   seed: int = SEED) -> Interval | None:
    """:func:`interval` of :func:`pair_ratios`: the median per-pair ratio and the ratio's own interval."""
    return interval(pair_ratios(num, den, scale), seed=seed)
