"""The numbers behind a drift decision: distances between a reference and a window, and the
tests that say whether a difference is larger than sampling noise.

Distances (effect sizes):

* :func:`psi` -- population stability index over shared bins, both fractions floored at
  ``1e-4`` so an empty bin stays finite; :func:`psi_noise_floor` is its expectation when
  nothing changed, ``(B - 1) (1/n + 1/N)`` (the second-order term of PSI is a chi-squared
  divergence, whose mean under no change that is), so a decision can use PSI minus noise;
* :func:`js_distance` -- Jensen-Shannon distance, base 2, in [0, 1];
* :func:`cdf_distances` -- KS (largest CDF gap) and W1 (area between the CDFs) of two
  weighted samples, evaluated at every jump of either CDF: the reference is the profile's
  KLL sketch (every retained item), the window its own KLL sketch.

Tests (p-values):

* :func:`chi2_homogeneity` -- chi-squared test of homogeneity on the 2 x B table of bin
  counts, with adjacent bins pooled until each expects at least 5 values in the smaller
  sample (Cochran's rule, so the chi-squared approximation holds at a few hundred rows);
* :func:`rate_test` -- is a share (NaN, Inf, unseen values) in the window different from the
  reference's? An exact binomial test of the window's count at the pooled rate (the limit of
  Fisher's exact test when the reference is much larger than the window);
* :func:`holm` -- Holm-Bonferroni adjusted p-values over every test of a window, so the
  chance that an unchanged window raises any alert is at most the configured alpha.

Special functions come from SciPy when it is installed (``pip install 'lockgate[stats]'``;
a microsecond per call) and from mpmath otherwise (a base dependency; ~0.3 ms per call, the
same values to double precision -- tests check the two agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

try:  # the fast path: scipy.special's cephes routines
    from scipy import special as _special
except ImportError:  # pragma: no cover - exercised by tests that hide scipy
    _special = None

FLOOR = 1e-4
MIN_EXPECTED = 5.0
REFERENCE_POINTS = 512  # reference CDF points KS and W1 are evaluated at (plus 257 window quantiles)


# ---------------------------------------------------------------- special functions
def _mp():
    import mpmath

    return mpmath


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-squared(dof)."""
    if dof <= 0:
        return 1.0
    if statistic <= 0:
        return 1.0
    if _special is not None:
        return float(_special.chdtrc(dof, statistic))
    mp = _mp()
    return float(mp.gammainc(dof / 2.0, statistic / 2.0, mp.inf, regularized=True))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    if _special is not None:
        return float(_special.bdtrc(k - 1, n, p))
    mp = _mp()  # P(X >= k) = I_p(k, n - k + 1)
    return float(mp.betainc(k, n - k + 1, 0, p, regularized=True))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    if _special is not None:
        return float(_special.bdtr(k, n, p))
    return 1.0 - binom_sf(k + 1, n, p)


def backend() -> str:
    """Which library computes the p-values (shown in reports)."""
    return "scipy" if _special is not None else "mpmath"


# ---------------------------------------------------------------- distances
def fractions(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)


def psi(reference: np.ndarray, live: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (fractions)."""
    p = np.maximum(np.asarray(reference, dtype=np.float64), FLOOR)
    q = np.maximum(np.asarray(live, dtype=np.float64), FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def psi_noise_floor(bins_with_mass: int, live_rows: int, reference_rows: int) -> float:
    """Expected PSI of a window of ``live_rows`` drawn from the reference itself."""
    if bins_with_mass < 2 or live_rows <= 0:
        return 0.0
    inv_ref = 1.0 / reference_rows if reference_rows > 0 else 0.0
    return (bins_with_mass - 1) * (1.0 / live_rows + inv_ref)


def js_distance(reference: np.ndarray, live: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2 (0 = same, 1 = disjoint)."""
    p = fractions(reference)
    q = fractions(live)
    m = (p + q) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(math.sqrt(max(0.0, (kl_p + kl_q) / 2.0)))


def ks_from_bins(reference: np.ndarray, live: np.ndarray) -> float:
    """Largest CDF gap at the bin edges (exact for bins that each hold one value)."""
    gaps = np.abs(np.cumsum(fractions(reference)) - np.cumsum(fractions(live)))
    return float(np.max(gaps, initial=0.0))


@dataclass(frozen=True, slots=True)
class StepCdf:
    """A weighted sample as a right-continuous step CDF: sorted distinct points, F at each."""

    points: np.ndarray
    cdf: np.ndarray
    probes: np.ndarray  # where distances evaluate it: the points at each 1/REFERENCE_POINTS of rank

    def at(self, x: np.ndarray) -> np.ndarray:
        """F(x) = P(X <= x) for each x."""
        index = np.searchsorted(self.points, x, side="right")
        return np.concatenate([[0.0], self.cdf])[index]


@lru_cache(maxsize=8192)
def reference_cdf(kll_base64: str) -> StepCdf | None:
    """The step CDF of a profile's serialised KLL sketch (cached: a profile outlives windows)."""
    import base64

    from datasketches import kll_floats_sketch

    if not kll_base64:
        return None
    sketch = kll_floats_sketch.deserialize(base64.b64decode(kll_base64))
    if sketch.is_empty():
        return None
    items = np.array(list(sketch), dtype=np.float64).reshape(-1, 2)
    order = np.argsort(items[:, 0], kind="stable")
    values, weights = items[order, 0], items[order, 1]
    points, starts = np.unique(values, return_index=True)
    cumulative = np.cumsum(weights)[np.r_[starts[1:] - 1, values.size - 1]] / weights.sum()
    probes = points
    if points.size > REFERENCE_POINTS:
        # probe at the jumps where the CDF crosses each 1/REFERENCE_POINTS of rank (and the
        # extremes): KS then misses at most that much rank (0.002), for half the work per window
        keep = np.unique(np.r_[0, np.searchsorted(cumulative, np.linspace(0, 1, REFERENCE_POINTS + 1)[1:-1]), points.size - 1])
        probes = points[keep]
    return StepCdf(points, cumulative, probes)


@lru_cache(maxsize=8)
def _grid(size: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, size)


def cdf_distances(reference: StepCdf, live_sketch, grid: int = 257) -> tuple[float, float]:
    """(KS, W1) between a reference step CDF and a window's KLL sketch.

    Both CDFs are evaluated at the reference's jumps (every one, or one per 1/512 of rank when
    there are more) and at ``grid`` quantiles of the window (its minimum and maximum
    included), so KS sees the jumps of both to within 0.002 and 1/``grid`` of rank; W1 integrates |F_ref - F_live| over the
    union of those points. With KLL k=400 on both sides this is within 0.01 of SciPy's
    ``ks_2samp`` on the raw rows at 10,000 rows (tests/test_drift_statistics.py).
    """
    live_points = np.asarray(live_sketch.get_quantiles(_grid(grid)), dtype=np.float64)
    points = np.unique(np.concatenate([reference.probes, live_points]))
    f_ref = reference.at(points)
    f_live = np.asarray(live_sketch.get_cdf(points, True), dtype=np.float64)[:-1]
    gaps = np.abs(f_ref - f_live)
    ks = float(gaps.max(initial=0.0))
    w1 = float(np.sum(gaps[:-1] * np.diff(points))) if points.size > 1 else 0.0
    return ks, w1


# ---------------------------------------------------------------- tests
@dataclass(frozen=True, slots=True)
class Chi2Result:
    statistic: float
    dof: int
    p_value: float
    groups: int  # columns after pooling


def pool_bins(expected: np.ndarray, minimum: float = MIN_EXPECTED) -> np.ndarray:
    """Group adjacent bins so each group's expected count reaches ``minimum``: returns the
    group index of every bin (a short last group joins the one before it)."""
    group = np.zeros(expected.size, dtype=np.int64)
    current, running = 0, 0.0
    for i, e in enumerate(expected.tolist()):
        group[i] = current
        running += e
        if running >= minimum:
            current += 1
            running = 0.0
    if running < minimum and current > 0 and expected.size and group[-1] == current:
        group[group == current] = current - 1
    return group


def chi2_homogeneity(reference_counts: np.ndarray, live_counts: np.ndarray, min_expected: float = MIN_EXPECTED) -> Chi2Result | None:
    """Chi-squared test that two samples of bin counts come from one distribution.

    Bins are pooled from the reference fractions alone (never from the window), so the
    grouping does not depend on the data being tested. None when fewer than two groups
    remain (nothing to compare) or a sample is empty.
    """
    ref = np.asarray(reference_counts, dtype=np.float64)
    live = np.asarray(live_counts, dtype=np.float64)
    n_ref, n_live = ref.sum(), live.sum()
    if n_ref <= 0 or n_live <= 0:
        return None
    expected_small = fractions(ref) * min(n_ref, n_live)
    group = pool_bins(expected_small, min_expected)
    groups = int(group.max()) + 1 if group.size else 0
    if groups < 2:
        return None
    table = np.vstack([np.bincount(group, weights=ref, minlength=groups), np.bincount(group, weights=live, minlength=groups)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return None
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    dof = table.shape[1] - 1
    return Chi2Result(statistic, dof, chi2_sf(statistic, dof), table.shape[1])


def rate_test(reference_hits: int, reference_total: int, live_hits: int, live_total: int, *, alternative: str = "two-sided") -> float | None:
    """p-value that the window's share ``live_hits / live_total`` differs from the
    reference's (``alternative="greater"``: exceeds it).

    Under no change both samples share one rate, estimated by pooling them; the window's
    count is then Binomial(live_total, pooled). Two-sided p doubles the smaller tail.
    None when the test cannot reject whatever happens: no hit in either sample, or an
    empty one (such a test is left out of the multiple-testing count).
    """
    if live_total <= 0 or reference_total <= 0:
        return None
    hits = reference_hits + live_hits
    if hits == 0 or hits == reference_total + live_total:
        return None
    pooled = hits / (reference_total + live_total)
    upper = binom_sf(live_hits, live_total, pooled)
    if alternative == "greater":
        return min(1.0, upper)
    lower = binom_cdf(live_hits, live_total, pooled)
    return min(1.0, 2.0 * min(upper, lower))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (reject where adjusted <= alpha)."""
    m = len(p_values)
    order = sorted(range(m), key=p_values.__getitem__)
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def bonferroni(p_values: list[float]) -> list[float]:
    m = len(p_values)
    return [min(1.0, m * p) for p in p_values]
