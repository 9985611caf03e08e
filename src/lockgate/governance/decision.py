"""From drift numbers to a status: the rules, and how sampling noise is kept out of them.

Every feature of a window is checked by up to four rules. A rule has a *test* (a p-value:
could sampling noise alone explain what the window shows?) and an *effect* (is the change
large enough to matter?):

==============  ===========================================  ==============================  ====================
rule            test                                         effect (DRIFT default)          applies to
==============  ===========================================  ==============================  ====================
distribution    chi-squared homogeneity on the bin counts    PSI - E0[PSI] >= 0.2, or        every feature, and a
                of the known values (adjacent bins pooled    W1/sigma >= 0.25 (numeric), or  classifier's classes
                to >= 5 expected)                            JS >= js (if configured)
nan_rate        binomial, two-sided, NaN count at the        NaN share change >= 0.05        every feature
                pooled NaN share
inf_rate        the same for +-Inf                           Inf share change >= 0.05        every feature
new_values      binomial, one-sided, count of values the     new share >= 0.01              categorical and
                reference never had                                                          discrete features
==============  ===========================================  ==============================  ====================

A rule *fires* when its effect reaches ``warn_fraction`` (WARN) or all (DRIFT) of its
threshold **and** its test is significant: its p-value, adjusted with every other test of
the window (Holm-Bonferroni by default), is at most ``alpha``. So a window of unchanged data
alerts with probability at most ``alpha`` whatever its size and feature count, and a window
large enough to make a negligible change significant still needs the change to be material.
A feature's status is the worst of its rules; each alert names the rule, the statistic and
its value, the threshold, and the p-values that decided it.

``E0[PSI] = (B - 1) (1/n + 1/N)`` is PSI's expectation under no change (B bins with reference
mass, n window values, N reference values), so the PSI threshold reads the same at 200 rows
as at 200,000. Tests that cannot reject whatever the data (no NaN anywhere, a single known
value) are left out of the correction, as Tarone's rule for discrete tests allows.

Status ``INCONCLUSIVE``: the window is smaller than ``min_rows``, or a feature had no rows.
It never alerts and never counts as OK.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import DriftConfig, Limits
from .statistics import bonferroni, holm

OK, WARN, DRIFT, INCONCLUSIVE = "OK", "WARN", "DRIFT", "INCONCLUSIVE"
RANK = {OK: 0, INCONCLUSIVE: 1, WARN: 2, DRIFT: 3}
DISTRIBUTION, NAN_RATE, INF_RATE, NEW_VALUES = "distribution", "nan_rate", "inf_rate", "new_values"


def worst(statuses) -> str:
    return max(statuses, key=RANK.__getitem__, default=OK)


@dataclass(slots=True)
class Effect:
    """One effect statistic of a rule, against its DRIFT threshold."""

    statistic: str  # psi | wasserstein | js | nan_share_change | inf_share_change | new_share
    value: float
    threshold: float
    reference: float | None = None  # shares: the reference's share
    observed: float | None = None  # shares: the window's share (value is the change from the reference)

    def level(self, warn_fraction: float) -> str:
        if self.value >= self.threshold:
            return DRIFT
        if self.value >= warn_fraction * self.threshold:
            return WARN
        return OK


@dataclass(slots=True)
class RuleResult:
    """One rule of one feature: its test, its effects, and what they decided."""

    rule: str
    test: str  # e.g. "chi-squared homogeneity, 12 dof"
    p_value: float | None  # None: the test cannot reject (left out of the correction)
    effects: list[Effect]
    adjusted_p: float | None = None
    significant: bool = False
    status: str = OK
    decided_by: str = ""  # the effect statistic that set the status

    def as_dict(self) -> dict:
        # by hand: dataclasses.asdict deep-copies and took a third of a 1,024-feature evaluation
        return {
            "rule": self.rule, "test": self.test, "p_value": self.p_value, "adjusted_p": self.adjusted_p,
            "significant": self.significant, "status": self.status, "decided_by": self.decided_by,
            "effects": [{"statistic": e.statistic, "value": e.value, "threshold": e.threshold,
                         "reference": e.reference, "observed": e.observed} for e in self.effects],
        }  # fmt: skip

    def describe(self, alpha: float) -> str:
        """One line an auditor can check: effect vs threshold, and the significance."""
        effect = next((e for e in self.effects if e.statistic == self.decided_by), None) or (self.effects[0] if self.effects else None)
        head = self.rule
        if effect is not None:
            shares = "" if effect.observed is None else f" (window {effect.observed:.4g}, reference {effect.reference:.4g})"
            head += f": {effect.statistic} {effect.value:.4g}{shares} vs DRIFT threshold {effect.threshold:.4g}"
        if self.p_value is None:
            return head + "; test not applicable"
        return head + (f"; {self.test} p={_p(self.p_value)}, adjusted p={_p(self.adjusted_p)} "
                       f"{'<=' if self.significant else '>'} alpha {alpha:g}")  # fmt: skip


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<1e-300" if value < 1e-300 else f"{value:.3g}"


def distribution_effects(limits: Limits, psi_excess: float, wasserstein: float | None, js: float) -> list[Effect]:
    effects = [Effect("psi", psi_excess, limits.psi)]
    if wasserstein is not None:
        effects.append(Effect("wasserstein", wasserstein, limits.wasserstein))
    if limits.js is not None:
        effects.append(Effect("js", js, limits.js))
    return effects


def adjust(p_values: list[float], correction: str) -> list[float]:
    if correction == "holm":
        return holm(p_values)
    if correction == "bonferroni":
        return bonferroni(p_values)
    return list(p_values)


def decide(rules_by_feature: list[list[RuleResult]], config: DriftConfig) -> list[str]:
    """Correct every test of the window together, then set each rule's and feature's status."""
    tested = [r for rules in rules_by_feature for r in rules if r.p_value is not None]
    for rule, adjusted in zip(tested, adjust([r.p_value for r in tested], config.correction)):  # type: ignore[misc]
        rule.adjusted_p = adjusted
        rule.significant = adjusted <= config.alpha
    warn_fraction = config.thresholds.warn_fraction
    statuses = []
    for rules in rules_by_feature:
        for rule in rules:
            if not rule.significant or not rule.effects:
                continue
            best = max(rule.effects, key=lambda e: (RANK[e.level(warn_fraction)], e.value / e.threshold))
            rule.status = best.level(warn_fraction)
            rule.decided_by = best.statistic if rule.status != OK else ""
        statuses.append(worst(r.status for r in rules))
    return statuses


def deciding(rules: list[RuleResult], status: str) -> list[RuleResult]:
    """The rules that set a feature's (non-OK) status, most decisive first."""
    if status not in (WARN, DRIFT):
        return []
    return sorted((r for r in rules if r.status == status), key=lambda r: r.adjusted_p if r.adjusted_p is not None else 1.0)
