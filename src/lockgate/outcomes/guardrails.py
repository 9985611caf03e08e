"""Outcome guardrails of a canary: quality against stable, fairness, label coverage.

The canary analysis (``routing.rollout``) asks this module for verdicts through one hook,
``CanaryController.set_outcome_guardrails``; each verdict is ``pass``, ``fail`` or
``inconclusive`` with the evidence behind it, which the analysis writes to the audit trail.

Both versions are judged over the same windows by prediction time: every window from the
one holding the canary's start up to now, merged over every replica. Labels arrive late and
unevenly, so the rules fail closed:

* ``min_label_coverage``: labeled / predicted rows of both versions must reach it;
  otherwise *inconclusive* (never passed).
* ``max_quality_drop``: per metric, the canary may be at most this much worse than stable
  (``stable - canary`` for accuracy-like metrics, ``canary - stable`` for losses and
  errors). Either version with fewer than ``min_labels`` labeled rows, or below the
  coverage bound, or a metric that is undefined on its rows: *inconclusive*.
* ``max_fairness_gap``: the canary's largest between-group gap (demographic parity
  difference, and equalized-odds difference once labels exist) over every protected segment
  and intersection, counting only groups of at least ``fairness.min_group_size``: above the
  bound fails; no segment with two groups large enough: *inconclusive*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lockgate.outcomes.fairness import fairness, largest_gap
from lockgate.outcomes.quality import CLASSIFICATION_METRICS, HIGHER_IS_BETTER, REGRESSION_METRICS, quality
from lockgate.outcomes.spec import OutcomeSpec
from lockgate.outcomes.state import OutcomeWindow
from lockgate.routing.policy import Guardrails
from lockgate.routing.rollout import GuardrailResult


@dataclass(frozen=True, slots=True)
class OutcomeGuardrailResult(GuardrailResult):
    """A guardrail verdict with structured evidence (both versions' figures) for the audit."""

    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = GuardrailResult.to_dict(self)
        out["evidence"] = self.evidence
        return out


def _coverage(state: OutcomeWindow | None) -> tuple[int, int, float | None]:
    if state is None:
        return 0, 0, None
    predictions, labeled = state.predictions, state.labeled
    return predictions, labeled, (labeled / predictions if predictions else None)


def evaluate(
    g: Guardrails,
    spec: OutcomeSpec | None,
    stable: OutcomeWindow | None,
    canary: OutcomeWindow | None,
    window: dict[str, Any],
) -> list[GuardrailResult]:
    """Verdicts of every outcome guardrail ``g`` configures (empty when it configures none)."""
    if not g.uses_outcomes:
        return []
    names = ([f"quality_drop:{m}" for m, _ in g.max_quality_drop or ()]
             + (["fairness_gap"] if g.max_fairness_gap is not None else [])
             + (["label_coverage"] if g.min_label_coverage is not None else []))
    if spec is None:
        return [OutcomeGuardrailResult(n, "inconclusive", None, None,
                                       "the model has no outcomes: section, so nothing records its predictions",
                                       {"window": window}) for n in names]
    sp, sl, scov = _coverage(stable)
    cp, cl, ccov = _coverage(canary)
    base = {"window": window, "min_labels": g.min_labels,
            "canary": {"predictions": cp, "labeled": cl, "coverage": ccov},
            "stable": {"predictions": sp, "labeled": sl, "coverage": scov}}
    results: list[GuardrailResult] = []

    coverage_ok = True
    short: list[str] = []
    for who, labeled, cov in (("canary", cl, ccov), ("stable", sl, scov)):
        if labeled < g.min_labels:
            short.append(f"{who} has {labeled} labeled rows < min_labels {g.min_labels}")
        if g.min_label_coverage is not None and (cov is None or cov < g.min_label_coverage):
            short.append(f"{who} label coverage {0.0 if cov is None else cov:.3f} < {g.min_label_coverage}")
    if short:
        coverage_ok = False
    if g.min_label_coverage is not None:
        defined = [c for c in (ccov, scov) if c is not None]
        observed = min(defined) if len(defined) == 2 else 0.0
        results.append(OutcomeGuardrailResult(
            "label_coverage", "pass" if coverage_ok else "inconclusive", observed, g.min_label_coverage,
            "; ".join(short) if short else f"coverage canary {ccov:.3f}, stable {scov:.3f} >= {g.min_label_coverage}",
            base))

    if g.max_quality_drop:
        confidence = spec.config.fairness.confidence
        canary_q = quality(canary, spec, confidence) if canary is not None else None
        stable_q = quality(stable, spec, confidence) if stable is not None else None
        allowed = CLASSIFICATION_METRICS if spec.classification else REGRESSION_METRICS
        for metric, bound in g.max_quality_drop:
            name = f"quality_drop:{metric}"
            if metric not in allowed:
                results.append(OutcomeGuardrailResult(name, "inconclusive", None, bound,
                                                      f"{metric} is not a metric of a {spec.task} model ({', '.join(allowed)})", base))
                continue
            if not coverage_ok:
                results.append(OutcomeGuardrailResult(name, "inconclusive", None, bound, "; ".join(short), base))
                continue
            c_entry = canary_q["metrics"].get(metric) if canary_q else None
            s_entry = stable_q["metrics"].get(metric) if stable_q else None
            c_value = c_entry.get("value") if c_entry else None
            s_value = s_entry.get("value") if s_entry else None
            evidence = {**base, "metric": metric, "higher_is_better": metric in HIGHER_IS_BETTER,
                        "canary_value": c_value, "stable_value": s_value,
                        "canary_ci": c_entry.get("ci") if c_entry else None, "stable_ci": s_entry.get("ci") if s_entry else None}
            if c_value is None or s_value is None:
                results.append(OutcomeGuardrailResult(name, "inconclusive", None, bound,
                                                      f"{metric} is undefined on the labeled rows "
                                                      f"(canary {c_value}, stable {s_value})", evidence))
                continue
            drop = (s_value - c_value) if metric in HIGHER_IS_BETTER else (c_value - s_value)
            ok = drop <= bound
            results.append(OutcomeGuardrailResult(
                name, "pass" if ok else "fail", drop, bound,
                f"{metric}: canary {c_value:.4f} vs stable {s_value:.4f} ({cl} / {sl} labeled rows): "
                f"{'drop' if drop > 0 else 'change'} {drop:+.4f} {'<=' if ok else '>'} allowed {bound}",
                evidence))

    if g.max_fairness_gap is not None:
        report = fairness(canary, spec) if canary is not None else []
        stable_report = fairness(stable, spec) if stable is not None else []
        gap = largest_gap(report)
        evidence = {**base, "canary": {**base["canary"], "segments": _summaries(report)},
                    "stable": {**base["stable"], "segments": _summaries(stable_report)},
                    "min_group_size": spec.config.fairness.min_group_size}
        if not spec.protected:
            results.append(OutcomeGuardrailResult("fairness_gap", "inconclusive", None, g.max_fairness_gap,
                                                  "the model declares no protected segments", evidence))
        elif gap is None:
            results.append(OutcomeGuardrailResult(
                "fairness_gap", "inconclusive", None, g.max_fairness_gap,
                f"no protected segment has two groups of at least {spec.config.fairness.min_group_size} canary rows",
                evidence))
        else:
            value, where = gap
            ok = value <= g.max_fairness_gap
            results.append(OutcomeGuardrailResult(
                "fairness_gap", "pass" if ok else "fail", value, g.max_fairness_gap,
                f"canary's largest gap {value:.4f} ({where}) {'<=' if ok else '>'} {g.max_fairness_gap}", evidence))
    return results


def _summaries(report: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-segment gaps (not every group) of a fairness report, for the evidence."""
    out = []
    for segment in report:
        summary = {k: (v.get("value") if isinstance(v, dict) else None) for k, v in segment["summary"].items()}
        out.append({"segment": segment["segment"], "reference": segment["reference"], **summary,
                    "breaches": segment["breaches"]})
    return out
