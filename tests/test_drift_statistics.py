"""Drift numbers against SciPy on generated data: PSI, JS, KS, W1, chi-squared, the binomial
tails and Holm's correction, and the mpmath fallback against SciPy's special functions."""

from __future__ import annotations

import numpy as np
import pytest
from datasketches import kll_floats_sketch
from scipy import special, stats
from scipy.spatial.distance import jensenshannon

from lockgate.governance import statistics
from lockgate.governance.config import GovernanceConfig
from lockgate.governance.engine import GovernanceEngine
from lockgate.governance.profile import build_profile, profile_feature
from lockgate.governance.statistics import (
    binom_cdf,
    binom_sf,
    cdf_distances,
    chi2_homogeneity,
    chi2_sf,
    holm,
    js_distance,
    psi,
    rate_test,
    reference_cdf,
)


def _fractions(rng: np.random.Generator, bins: int) -> tuple[np.ndarray, np.ndarray]:
    p = rng.dirichlet(np.full(bins, 2.0))
    q = rng.dirichlet(np.full(bins, 2.0))
    return p, q


@pytest.mark.parametrize("seed", range(5))
def test_psi_and_js_equal_scipy(seed):
    p, q = _fractions(np.random.default_rng(seed), 12)
    # PSI is the symmetrised KL divergence: sum (q - p) ln(q / p) = KL(p||q) + KL(q||p)
    expected = special.rel_entr(p, q).sum() + special.rel_entr(q, p).sum()
    assert psi(p, q) == pytest.approx(expected, rel=1e-12)
    assert js_distance(p, q) == pytest.approx(jensenshannon(p, q, base=2), rel=1e-9)
    assert js_distance(p, p) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_ks_and_w1_from_kll_sketches_are_within_tolerance_of_scipy_at_10k_rows(seed):
    """KS from the two KLL CDFs (every reference point and 257 window quantiles) is within
    0.01 of ks_2samp on the raw rows, at 10,000 window rows; W1 within 0.02 sigma + 3%."""
    rng = np.random.default_rng(100 + seed)
    reference = rng.normal(size=50_000).astype(np.float32)
    shift, scale = [(0, 1), (0.05, 1), (0.2, 1.1), (0.5, 1), (1.0, 0.8), (0, 1.3), (-0.3, 1), (2.0, 1)][seed]
    live = (rng.normal(size=10_000) * scale + shift).astype(np.float32)
    feature = profile_feature("a", reference, categorical=False, bins=20, kll_k=400)
    window = kll_floats_sketch(400)
    window.update(live)
    ks, w1 = cdf_distances(reference_cdf(feature.kll), window)
    assert abs(ks - stats.ks_2samp(reference, live).statistic) <= 0.01
    exact = stats.wasserstein_distance(reference, live)
    assert abs(w1 - exact) <= 0.02 + 0.03 * exact


def test_chi2_homogeneity_equals_scipy_contingency():
    rng = np.random.default_rng(3)
    ref = rng.integers(50, 500, size=9).astype(float)
    live = rng.integers(20, 200, size=9).astype(float)
    result = chi2_homogeneity(ref, live)
    expected = stats.chi2_contingency(np.vstack([ref, live]), correction=False)
    assert result.groups == 9 and result.dof == expected.dof
    assert result.statistic == pytest.approx(expected.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(expected.pvalue, rel=1e-9)


def test_chi2_pools_bins_expected_below_five_like_a_hand_pooled_table():
    ref = np.array([5000, 10, 4000, 3000, 20, 5, 2000], dtype=float)
    live = np.array([50, 3, 40, 35, 1, 0, 20], dtype=float)
    result = chi2_homogeneity(ref, live)
    # expected live counts (n=149): 53.6, 0.1, 42.9, 32.2, 0.2, 0.05, 21.5 -> bins 1 and 2 pool,
    # and 4, 5, 6 pool (Cochran: each group expects >= 5 in the smaller sample)
    pooled = lambda a: np.array([a[0], a[1] + a[2], a[3], a[4] + a[5] + a[6]])  # noqa: E731
    expected = stats.chi2_contingency(np.vstack([pooled(ref), pooled(live)]), correction=False)
    assert result.groups == 4
    assert result.statistic == pytest.approx(expected.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(expected.pvalue, rel=1e-9)


def test_evaluated_window_numbers_equal_scipy_on_the_same_rows():
    """End to end: the kernel's bins and the report's PSI, JS and chi-squared equal SciPy's on
    numpy's binning of the same rows."""
    rng = np.random.default_rng(11)
    reference = rng.normal(size=(20_000, 2)).astype(np.float32)
    reference[:, 1] = rng.choice(4, size=20_000, p=[0.4, 0.3, 0.2, 0.1])
    profile = build_profile({"x": reference}, {"x": ["num", "cat"]}, {"x": ["cat"]}, model="m", version="1")
    config = GovernanceConfig.model_validate({"drift": {"window_rows": 10**9}, "payload_log": {"enabled": False}})
    engine = GovernanceEngine("m", "1", config, ["x"], profile, background=False)
    live = rng.normal(0.3, 1.2, size=(3_000, 2)).astype(np.float32)
    live[:, 1] = rng.choice(4, size=3_000, p=[0.25, 0.25, 0.25, 0.25])
    engine.inspect({"x": live}, "r")
    report = engine.close_window()
    engine.close(final_window=False)
    for j, feature in enumerate(report.features):
        ref = profile.tensors["x"].features[j]
        edges = np.asarray(ref.edges)
        counts = np.bincount(np.searchsorted(edges, live[:, j].astype(np.float64), side="right"), minlength=edges.size + 1)
        assert feature.live_counts == counts.tolist()
        known = ref.known_bins()
        p = np.asarray(ref.fractions)[known]
        q = counts[known] / counts[known].sum()
        pf, qf = np.maximum(p, 1e-4), np.maximum(q, 1e-4)
        assert feature.psi == pytest.approx(special.rel_entr(pf, qf).sum() + special.rel_entr(qf, pf).sum(), rel=1e-9)
        assert feature.js == pytest.approx(jensenshannon(p, q, base=2), rel=1e-9)
        table = np.vstack([p * ref.count, counts[known]])
        expected = stats.chi2_contingency(table, correction=False)
        assert feature.chi2 == pytest.approx(expected.statistic, rel=1e-9)
        assert feature.chi2_p == pytest.approx(expected.pvalue, rel=1e-6, abs=1e-300)
    numeric = report.features[0]
    ks = stats.ks_2samp(reference[:, 0], live[:, 0]).statistic
    assert abs(numeric.ks - ks) <= 0.01
    w1 = stats.wasserstein_distance(reference[:, 0], live[:, 0]) / profile.tensors["x"].features[0].std
    assert numeric.wasserstein == pytest.approx(w1, abs=0.02) and numeric.wasserstein_unit == "sigma"


def test_binomial_tails_and_rate_test_equal_scipy():
    for k, n, p in ((0, 10, 0.1), (3, 200, 0.01), (40, 1000, 0.05), (999, 1000, 0.99), (7, 7, 0.5)):
        assert binom_sf(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300)
        assert binom_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-300)
    # two-sided: twice the smaller tail at the pooled rate
    pooled = (2500 + 180) / (50_000 + 2_000)
    expected = 2 * min(stats.binom.sf(179, 2_000, pooled), stats.binom.cdf(180, 2_000, pooled))
    assert rate_test(2500, 50_000, 180, 2_000) == pytest.approx(expected, rel=1e-9)
    assert rate_test(0, 50_000, 0, 2_000) is None  # cannot reject: left out of the correction
    assert rate_test(0, 50_000, 5, 1_000, alternative="greater") == pytest.approx(stats.binom.sf(4, 1_000, 5 / 51_000), rel=1e-9)


def test_holm_adjusted_p_values_match_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    m = len(p)
    order = np.argsort(p)
    expected = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        expected[i] = running
    assert holm(p) == pytest.approx(expected.tolist())
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.5])


def test_mpmath_fallback_equals_scipy(monkeypatch):
    cases = [(0.5, 1), (3.84, 1), (25.0, 19), (300.0, 19), (1e-3, 4)]
    binomials = [(3, 200, 0.01), (40, 1000, 0.05), (1, 2000, 1e-5)]
    with_scipy = [chi2_sf(x, d) for x, d in cases] + [binom_sf(*b) for b in binomials] + [binom_cdf(*b) for b in binomials]
    monkeypatch.setattr(statistics, "_special", None)
    assert statistics.backend() == "mpmath"
    without = [chi2_sf(x, d) for x, d in cases] + [binom_sf(*b) for b in binomials] + [binom_cdf(*b) for b in binomials]
    assert without == pytest.approx(with_scipy, rel=1e-9, abs=1e-300)
