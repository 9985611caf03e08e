"""Progressive canary: analyse each interval's window, then advance, fail, roll back or pause.

Modelled on Argo Rollouts' analysis (interval, success conditions, failureLimit, an
inconclusive result that pauses for a human), but evaluated inside the gateway against the
gateway's own numbers, including the governance module's drift status.

* `WindowStats` / `TrafficStats` collect per-version request, error and latency numbers for
  the current analysis window (p99 over a bounded reservoir sample of latencies).
* `analyse` is the pure decision: guardrails of a canary window against the stable window.
* `CanaryController` turns decisions into new policy snapshots (each revision + 1, each with
  one audit event), takes operator commands, latches drift alerts, and `run()` drives it on
  a clock so tests need no sleeping.

Run the controller on one replica only (the leader); the others follow the published
policies.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Literal, Protocol

import numpy as np

from lockgate.routing.changes import SYSTEM_ACTOR, EmitFn, GateFn, PolicyChanges
from lockgate.routing.policy import (
    CanarySpec,
    CanaryState,
    Guardrails,
    PolicyBook,
    PolicyError,
    TrafficPolicy,
)
from lockgate.routing.shadow import AgreementBook

log = logging.getLogger(__name__)

#: Latency samples kept per version and window (float64: 128 KiB per version).
LATENCY_SAMPLE = 16_384

#: Drift statuses (from governance) that fail the drift guardrail, compared case-insensitively.
FAILING_DRIFT_STATUSES = frozenset({"drift", "critical", "alert"})


# ---------------------------------------------------------------------------------- windows
@dataclass(frozen=True, slots=True)
class VersionWindow:
    """One version's numbers over one analysis window."""

    version: str
    requests: int
    errors: int
    p99_ms: float | None
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p99_ms": self.p99_ms,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }


class WindowStats:
    """Requests, errors and a latency sample of one version for the current window. Thread-safe.

    p99 comes from numpy over a bounded uniform sample of the window's latencies (reservoir
    sampling, `capacity` floats): exact while the window has fewer requests than that, an
    unbiased sample beyond it. A KLL sketch was the alternative, but its ~1 % rank error is
    too coarse at the 99th percentile a latency guardrail judges.

    Count a request once it has an outcome: an error is a failure of the version (inference
    failed, timed out, overloaded), not a client's INVALID_ARGUMENT. Latency is recorded for
    every request, failed ones included (a timing-out canary must look slow).
    """

    __slots__ = ("version", "capacity", "_lock", "_requests", "_errors", "_sample", "_started_at", "_rng")

    def __init__(self, version: str, started_at: float = 0.0, capacity: int = LATENCY_SAMPLE) -> None:
        if capacity < 1:
            raise ValueError("latency sample capacity must be >= 1")
        self.version = version
        self.capacity = capacity
        self._lock = threading.Lock()
        self._requests = 0
        self._errors = 0
        self._sample = np.empty(capacity, dtype=np.float64)
        self._started_at = started_at
        self._rng = random.Random(0x10C6A7E)

    def record(self, latency_ms: float, ok: bool) -> None:
        with self._lock:
            seen = self._requests
            self._requests = seen + 1
            if not ok:
                self._errors += 1
            if seen < self.capacity:
                self._sample[seen] = latency_ms
            else:
                slot = int(self._rng.random() * (seen + 1))  # Algorithm R; random() is ~10x cheaper than randrange
                if slot < self.capacity:
                    self._sample[slot] = latency_ms

    def peek(self, now: float = 0.0) -> VersionWindow:
        with self._lock:
            return self._snapshot(now)

    def take(self, now: float = 0.0) -> VersionWindow:
        """The window so far, and start a new one."""
        with self._lock:
            window = self._snapshot(now)
            self._reset(now)
            return window

    def reset(self, now: float = 0.0) -> None:
        with self._lock:
            self._reset(now)

    def _snapshot(self, now: float) -> VersionWindow:
        filled = min(self._requests, self.capacity)
        p99 = float(np.percentile(self._sample[:filled], 99)) if filled else None
        return VersionWindow(self.version, self._requests, self._errors, p99, self._started_at, now)

    def _reset(self, now: float) -> None:
        self._requests = 0
        self._errors = 0
        self._started_at = now


class StatsProvider(Protocol):
    """What the controller's loop needs each interval (`TrafficStats` implements it)."""

    def take_window(self, model: str, version: str, now: float) -> VersionWindow: ...

    def reset_window(self, model: str, version: str, now: float) -> None: ...

    def take_disagreement(self, model: str, stable: str, canary: str) -> float | None: ...


class TrafficStats:
    """Per (model, version) windows, plus the shadow agreement book for disagreement."""

    def __init__(self, agreements: AgreementBook | None = None) -> None:
        self._windows: dict[tuple[str, str], WindowStats] = {}
        self._lock = threading.Lock()
        self.agreements = agreements

    def window(self, model: str, version: str) -> WindowStats:
        key = (model, version)
        found = self._windows.get(key)
        if found is not None:
            return found
        with self._lock:
            return self._windows.setdefault(key, WindowStats(version, time.time()))

    def record(self, model: str, version: str, latency_ms: float, ok: bool) -> None:
        """Call once per primary request when its outcome is known (the lead's pipeline)."""
        self.window(model, version).record(latency_ms, ok)

    def take_window(self, model: str, version: str, now: float) -> VersionWindow:
        return self.window(model, version).take(now)

    def reset_window(self, model: str, version: str, now: float) -> None:
        self.window(model, version).reset(now)

    def take_disagreement(self, model: str, stable: str, canary: str) -> float | None:
        if self.agreements is None:
            return None
        rate = self.agreements.disagreement(model, stable, canary)
        self.agreements.reset(model, stable, canary)
        return rate


# ---------------------------------------------------------------------------------- analysis
GuardrailStatus = Literal["pass", "fail", "inconclusive", "skipped"]
Outcome = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True, slots=True)
class GuardrailResult:
    """One guardrail's verdict with the numbers behind it (this is the audit evidence)."""

    name: str
    status: GuardrailStatus
    observed: float | str | None
    threshold: float | str | None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "guardrail": self.name,
            "status": self.status,
            "observed": self.observed,
            "threshold": self.threshold,
            "detail": self.detail,
        }


#: (model, canary spec, now) -> verdicts judged outside this module (the outcome guardrails).
OutcomeGuardrailsFn = Callable[[str, CanarySpec, float], Sequence[GuardrailResult]]


@dataclass(frozen=True, slots=True)
class Analysis:
    outcome: Outcome
    results: tuple[GuardrailResult, ...]

    @property
    def failed(self) -> tuple[GuardrailResult, ...]:
        return tuple(r for r in self.results if r.status == "fail")

    @property
    def reason(self) -> str:
        picked = self.failed if self.outcome == "fail" else tuple(r for r in self.results if r.status == "inconclusive")
        return "; ".join(f"{r.name}: {r.detail}" for r in picked) or "all guardrails passed"


def drift_status_name(status: object) -> str | None:
    """Normalise a governance drift status (str or Enum) to lower-case text."""
    if status is None:
        return None
    value = status.value if isinstance(status, Enum) else status
    return str(value).strip().lower()


def analyse(
    guardrails: Guardrails,
    stable: VersionWindow,
    canary: VersionWindow,
    drift_status: object = None,
    disagreement: float | None = None,
    baseline: VersionWindow | None = None,
    extra: Sequence[GuardrailResult] = (),
) -> Analysis:
    """Judge one analysis window. Pure: same inputs, same verdict.

    Conclusive even with few requests: drift reported by governance, and a canary that has
    already failed more than its error budget over `min_requests` (one more request cannot
    redeem it). Otherwise a canary window below `min_requests` is inconclusive. Ratio
    guardrails compare with the stable window, or with `baseline` (the last conclusive
    stable window) when stable got too little traffic, e.g. at a 100 % step.
    """
    g = guardrails
    results: list[GuardrailResult] = []
    enough = canary.requests >= g.min_requests
    short = f"{canary.requests} canary requests < min_requests {g.min_requests}"
    reference = stable if stable.requests >= g.min_requests else baseline
    if reference is not None and reference.requests < g.min_requests:
        reference = None
    no_ref = f"stable has {stable.requests} requests < min_requests {g.min_requests} and no baseline"

    if g.fail_on_drift:
        status = drift_status_name(drift_status)
        failing = status in FAILING_DRIFT_STATUSES
        results.append(
            GuardrailResult(
                "drift",
                "fail" if failing else "pass",
                status or "unknown",
                "not " + "/".join(sorted(FAILING_DRIFT_STATUSES)),
                f"governance reports {status} on the canary's inputs" if failing else "no drift reported",
            )
        )

    if g.max_error_rate is not None:
        if enough:
            ok = canary.error_rate <= g.max_error_rate
            results.append(
                GuardrailResult(
                    "error_rate",
                    "pass" if ok else "fail",
                    canary.error_rate,
                    g.max_error_rate,
                    f"{canary.errors}/{canary.requests} = {canary.error_rate:.4f} {'<=' if ok else '>'} {g.max_error_rate}",
                )
            )
        elif canary.errors > g.max_error_rate * g.min_requests:
            results.append(
                GuardrailResult(
                    "error_rate",
                    "fail",
                    canary.errors / g.min_requests,
                    g.max_error_rate,
                    f"{canary.errors} errors already exceed the budget of {g.max_error_rate} over "
                    f"min_requests {g.min_requests} ({canary.requests} requests so far)",
                )
            )
        else:
            results.append(GuardrailResult("error_rate", "inconclusive", canary.error_rate, g.max_error_rate, short))

    if g.max_error_ratio is not None:
        if not enough:
            results.append(GuardrailResult("error_ratio", "inconclusive", None, g.max_error_ratio, short))
        elif reference is None:
            results.append(GuardrailResult("error_ratio", "inconclusive", None, g.max_error_ratio, no_ref))
        else:
            limit = g.max_error_ratio * max(reference.error_rate, g.error_rate_floor)
            ok = canary.error_rate <= limit
            results.append(
                GuardrailResult(
                    "error_ratio",
                    "pass" if ok else "fail",
                    canary.error_rate,
                    limit,
                    f"canary {canary.error_rate:.4f} vs stable {reference.error_rate:.4f} "
                    f"(limit {g.max_error_ratio}x, floor {g.error_rate_floor})",
                )
            )

    if g.max_p99_ratio is not None:
        if not enough or canary.p99_ms is None:
            results.append(GuardrailResult("p99_ratio", "inconclusive", canary.p99_ms, g.max_p99_ratio, short))
        elif reference is None or reference.p99_ms is None:
            results.append(GuardrailResult("p99_ratio", "inconclusive", canary.p99_ms, g.max_p99_ratio, no_ref))
        else:
            limit = g.max_p99_ratio * max(reference.p99_ms, g.p99_floor_ms)
            ok = canary.p99_ms <= limit
            results.append(
                GuardrailResult(
                    "p99_ratio",
                    "pass" if ok else "fail",
                    canary.p99_ms,
                    limit,
                    f"canary p99 {canary.p99_ms:.3f} ms vs stable {reference.p99_ms:.3f} ms "
                    f"(limit {g.max_p99_ratio}x, floor {g.p99_floor_ms} ms)",
                )
            )

    if g.max_p99_ms is not None:
        if not enough or canary.p99_ms is None:
            results.append(GuardrailResult("p99_ms", "inconclusive", canary.p99_ms, g.max_p99_ms, short))
        else:
            ok = canary.p99_ms <= g.max_p99_ms
            results.append(
                GuardrailResult(
                    "p99_ms",
                    "pass" if ok else "fail",
                    canary.p99_ms,
                    g.max_p99_ms,
                    f"canary p99 {canary.p99_ms:.3f} ms {'<=' if ok else '>'} {g.max_p99_ms} ms",
                )
            )

    if g.max_disagreement is not None:
        if disagreement is None:
            results.append(
                GuardrailResult("disagreement", "skipped", None, g.max_disagreement, "no mirrored comparisons in the window")
            )
        else:
            ok = disagreement <= g.max_disagreement
            results.append(
                GuardrailResult(
                    "disagreement",
                    "pass" if ok else "fail",
                    disagreement,
                    g.max_disagreement,
                    f"top-class disagreement with stable {disagreement:.4f} {'<=' if ok else '>'} {g.max_disagreement}",
                )
            )

    results.extend(extra)  # verdicts judged elsewhere (the outcome guardrails)
    statuses = {r.status for r in results}
    outcome: Outcome = "fail" if "fail" in statuses else "inconclusive" if "inconclusive" in statuses else "pass"
    return Analysis(outcome, tuple(results))


# ---------------------------------------------------------------------------------- controller
ActionKind = Literal[
    "none", "started", "advanced", "failed", "rolled_back", "paused", "resumed", "promoted", "aborted"
]


@dataclass(frozen=True, slots=True)
class CanaryAction:
    """What one evaluation or operator command did."""

    kind: ActionKind
    model: str
    policy: TrafficPolicy | None = None
    event: dict[str, Any] | None = None
    analysis: Analysis | None = None
    windows: Mapping[str, VersionWindow] = field(default_factory=dict)


def _canary_weights(spec: CanarySpec, percent: int) -> dict[str, int]:
    return {spec.stable: 100 - percent, spec.canary: percent}


class CanaryController:
    """Drives every model's canary: analysis each interval, operator commands, drift alerts.

    State lives in the published `TrafficPolicy` (step, failures, state), so a restarted
    controller continues where the store says the canary is. Failures accumulate over the
    whole canary (a pass does not reset them), which is the conservative reading of
    `failure_limit`.
    """

    def __init__(
        self,
        book: PolicyBook,
        emit: EmitFn | None = None,
        *,
        servable: GateFn | None = None,
        changes: PolicyChanges | None = None,
    ) -> None:
        """
        Args:
            book: the live snapshots (shared with the `Router`).
            emit: receives (event, new policy) after every change: persist + audit it.
            servable: (model, version) → approved to serve? Checked when a canary starts.
            changes: share one `PolicyChanges` with the admin API instead of `emit`/`servable`.
        """
        self.changes = changes or PolicyChanges(book, emit, servable=servable)
        self.book = self.changes.book
        self._drift: dict[tuple[str, str], str] = {}
        self._baseline: dict[str, VersionWindow] = {}
        #: model → (analysis generation, due time) of the next evaluation.
        self._schedule: dict[str, tuple[tuple[Any, ...], float]] = {}
        self.tick_errors = 0
        self._outcome_guardrails: OutcomeGuardrailsFn | None = None

    def set_outcome_guardrails(self, judge: OutcomeGuardrailsFn) -> None:
        """``judge(model, canary spec, now)`` returns the verdicts of the outcome guardrails
        (quality, fairness, label coverage; ``lockgate.outcomes``). Without one, a policy that
        sets them is inconclusive."""
        self._outcome_guardrails = judge

    # ---------------------------------------------------------------- governance hook
    def on_drift_alert(self, model: str, version: str, status: object) -> None:
        """Latch governance's latest drift status of a version; the next analysis reads it."""
        name = drift_status_name(status)
        if name is None:
            self._drift.pop((model, version), None)
        else:
            self._drift[(model, version)] = name

    def drift_status(self, model: str, version: str) -> str | None:
        return self._drift.get((model, version))

    # ---------------------------------------------------------------- operator commands
    def start(
        self,
        model: str,
        canary: str,
        *,
        actor: str,
        now: float | None = None,
        steps: tuple[int, ...] | list[int] = (5, 25, 50, 100),
        interval_s: float = 60.0,
        guardrails: Guardrails | None = None,
        failure_limit: int = 3,
        stable: str | None = None,
    ) -> CanaryAction:
        """`traffic canary start MODEL V --steps 5,25,50,100 --interval 60s`.

        The stable version defaults to the model's only live version. The canary takes
        ``steps[0]`` % from it; other live versions (if `stable` was named) are dropped from
        the split, so the analysis compares exactly two versions.
        """
        now = time.time() if now is None else now
        old = self.book.get(model)
        if old is not None and old.canary is not None and old.canary.state.active:
            raise PolicyError(f"model '{model}' already has a canary of version {old.canary.canary} in progress")
        if stable is None:
            live = old.versions if old is not None else ()
            if len(live) != 1:
                raise PolicyError(
                    f"model '{model}' has {len(live)} live versions ({', '.join(live) or 'none'}); name the stable one"
                )
            stable = live[0]
        self.changes.check_servable(model, (stable, canary))
        spec = CanarySpec(
            stable=stable,
            canary=canary,
            steps=tuple(steps),
            interval_s=interval_s,
            guardrails=guardrails or Guardrails(),
            failure_limit=failure_limit,
            started_at=now,
        )
        weights = _canary_weights(spec, spec.percent)
        if old is None:
            new = TrafficPolicy(model=model, revision=1, weights=weights, canary=spec)
        else:
            shadow = old.shadow if old.shadow is None or old.shadow.version != canary else None
            new = old.evolve(weights=weights, canary=spec, shadow=shadow)
        self._baseline.pop(model, None)
        self._schedule.pop(model, None)
        event = self.changes.commit(old, new, "traffic.canary.started", actor, {"canary": canary, "stable": stable, "percent": spec.percent})
        return CanaryAction("started", model, new, event)

    def promote(self, model: str, *, actor: str, reason: str = "promoted by operator") -> CanaryAction:
        """Give the canary 100 % now; it becomes the stable version."""
        old, spec = self._active(model)
        new = old.evolve(
            weights={spec.canary: 100},
            canary=_spec(spec, state=CanaryState.PROMOTED, reason=reason),
        )
        event = self.changes.commit(
            old, new, "traffic.canary.promoted", actor,
            {"canary": spec.canary, "previous_stable": spec.stable, "new_stable": spec.canary, "reason": reason, "step": spec.step_index},
        )
        self._forget(model)
        return CanaryAction("promoted", model, new, event)

    def abort(self, model: str, *, actor: str, reason: str = "aborted by operator") -> CanaryAction:
        """Send all traffic back to stable now."""
        old, spec = self._active(model)
        new = old.evolve(weights={spec.stable: 100}, canary=_spec(spec, state=CanaryState.ABORTED, reason=reason))
        event = self.changes.commit(
            old, new, "traffic.canary.aborted", actor, {"canary": spec.canary, "stable": spec.stable, "reason": reason}
        )
        self._forget(model)
        return CanaryAction("aborted", model, new, event)

    def pause(self, model: str, *, actor: str, reason: str = "paused by operator") -> CanaryAction:
        """Hold the current step (traffic split unchanged) until `resume`."""
        old, spec = self._active(model)
        if spec.state is CanaryState.PAUSED:
            return CanaryAction("none", model, old)
        new = old.evolve(canary=_spec(spec, state=CanaryState.PAUSED, reason=reason))
        event = self.changes.commit(old, new, "traffic.canary.paused", actor, {"canary": spec.canary, "reason": reason})
        self._schedule.pop(model, None)
        return CanaryAction("paused", model, new, event)

    def resume(self, model: str, *, actor: str) -> CanaryAction:
        """Continue a paused canary; its next analysis window starts now."""
        old, spec = self._active(model)
        if spec.state is CanaryState.PROGRESSING:
            return CanaryAction("none", model, old)
        new = old.evolve(canary=_spec(spec, state=CanaryState.PROGRESSING, reason=None))
        event = self.changes.commit(old, new, "traffic.canary.resumed", actor, {"canary": spec.canary, "was": spec.reason})
        self._schedule.pop(model, None)
        return CanaryAction("resumed", model, new, event)

    # ---------------------------------------------------------------- analysis
    def evaluate(
        self,
        model: str,
        now: float,
        stats_stable: VersionWindow,
        stats_canary: VersionWindow,
        drift_status_canary: object = None,
        disagreement: float | None = None,
    ) -> CanaryAction:
        """Judge one window of a progressing canary and publish the consequence.

        `drift_status_canary` defaults to the status latched by `on_drift_alert`.
        """
        old = self.book.get(model)
        if old is None or old.canary is None or old.canary.state is not CanaryState.PROGRESSING:
            return CanaryAction("none", model, old)
        spec = old.canary
        if drift_status_canary is None:
            drift_status_canary = self._drift.get((model, spec.canary))
        g = spec.guardrails
        if stats_stable.requests >= g.min_requests:
            self._baseline[model] = stats_stable
        if not g.uses_outcomes:
            extra: Sequence[GuardrailResult] = ()
        elif self._outcome_guardrails is None:  # configured but nothing can judge them: fail closed
            extra = (GuardrailResult("outcomes", "inconclusive", None, None, "no outcome evaluator in this process"),)
        else:
            try:
                extra = self._outcome_guardrails(model, spec, now)
            except Exception as exc:  # a guardrail that cannot be evaluated is inconclusive, never passed
                log.exception("outcome guardrails of %s could not be evaluated", model)
                extra = (GuardrailResult("outcomes", "inconclusive", None, None,
                                         f"the outcome guardrails could not be evaluated ({type(exc).__name__}: {exc})"),)
        analysis = analyse(g, stats_stable, stats_canary, drift_status_canary, disagreement, self._baseline.get(model), extra)
        windows = {"stable": stats_stable, "canary": stats_canary}
        evidence = {
            "canary": spec.canary,
            "stable": spec.stable,
            "step": spec.step_index,
            "percent": spec.percent,
            "outcome": analysis.outcome,
            "guardrails": [r.to_dict() for r in analysis.results],
            "window": {
                "interval_s": spec.interval_s,
                "evaluated_at": now,
                "stable": stats_stable.to_dict(),
                "canary": stats_canary.to_dict(),
                "baseline": self._baseline[model].to_dict() if model in self._baseline else None,
            },
        }
        kind: ActionKind
        if analysis.outcome == "pass":
            if spec.last_step:
                kind, action = "promoted", "traffic.canary.promoted"
                new = old.evolve(weights={spec.canary: 100}, canary=_spec(spec, state=CanaryState.PROMOTED, reason="all steps passed"))
                evidence.update(previous_stable=spec.stable, new_stable=spec.canary)
            else:
                kind, action = "advanced", "traffic.canary.advanced"
                nxt = _spec(spec, step_index=spec.step_index + 1)
                new = old.evolve(weights=_canary_weights(nxt, nxt.percent), canary=nxt)
                evidence.update(next_step=nxt.step_index, next_percent=nxt.percent)
        elif analysis.outcome == "fail":
            failures = spec.failures + 1
            first = analysis.failed[0]
            evidence.update(
                failures=failures,
                failure_limit=spec.failure_limit,
                guardrail=first.name,
                observed=first.observed,
                threshold=first.threshold,
                reason=analysis.reason,
            )
            if failures >= spec.failure_limit:
                kind, action = "rolled_back", "traffic.canary.rolled_back"
                new = old.evolve(
                    weights={spec.stable: 100},
                    canary=_spec(spec, failures=failures, state=CanaryState.ROLLED_BACK, reason=analysis.reason),
                )
            else:
                kind, action = "failed", "traffic.canary.analysis_failed"
                new = old.evolve(canary=_spec(spec, failures=failures, reason=analysis.reason))
        else:
            kind, action = "paused", "traffic.canary.paused"
            evidence.update(reason=analysis.reason)
            new = old.evolve(canary=_spec(spec, state=CanaryState.PAUSED, reason=f"inconclusive: {analysis.reason}"))
        event = self.changes.commit(old, new, action, SYSTEM_ACTOR, evidence)
        if new.canary is not None and new.canary.state is CanaryState.PROGRESSING:
            self._schedule[model] = (_generation(new.canary), now + new.canary.interval_s)
        else:
            self._schedule.pop(model, None)
            if not new.canary or not new.canary.state.active:
                self._forget(model)
        return CanaryAction(kind, model, new, event, analysis, windows)

    def tick(self, now: float, stats: StatsProvider) -> list[CanaryAction]:
        """Evaluate every progressing canary whose interval has elapsed.

        A canary seen for the first time at its current step (or after a failure, a resume
        or a restart) starts a fresh window now: numbers from the previous split must not
        judge the new one.
        """
        actions: list[CanaryAction] = []
        for model, policy in self.book.items():
            spec = policy.canary
            if spec is None or spec.state is not CanaryState.PROGRESSING:
                self._schedule.pop(model, None)
                continue
            gen = _generation(spec)
            scheduled = self._schedule.get(model)
            if scheduled is None or scheduled[0] != gen:
                self._schedule[model] = (gen, now + spec.interval_s)
                stats.reset_window(model, spec.stable, now)
                stats.reset_window(model, spec.canary, now)
                stats.take_disagreement(model, spec.stable, spec.canary)
                continue
            if now < scheduled[1]:
                continue
            try:
                stable = stats.take_window(model, spec.stable, now)
                canary = stats.take_window(model, spec.canary, now)
                disagreement = stats.take_disagreement(model, spec.stable, spec.canary)
                actions.append(self.evaluate(model, now, stable, canary, None, disagreement))
            except Exception:  # one model's bad numbers must not stop the others' analysis
                self.tick_errors += 1
                log.exception("canary analysis of model %s failed", model)
        return actions

    async def run(
        self,
        stats: StatsProvider,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        tick_s: float = 1.0,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Background loop: `tick` every `tick_s` until `stop` is set (or the task is cancelled)."""
        while stop is None or not stop.is_set():
            try:
                self.tick(clock(), stats)
            except Exception:
                self.tick_errors += 1
                log.exception("canary controller tick failed")
            await sleep(tick_s)

    # ---------------------------------------------------------------- helpers
    def _active(self, model: str) -> tuple[TrafficPolicy, CanarySpec]:
        policy = self.book.get(model)
        if policy is None or policy.canary is None or not policy.canary.state.active:
            raise PolicyError(f"model '{model}' has no canary in progress")
        return policy, policy.canary

    def _forget(self, model: str) -> None:
        self._schedule.pop(model, None)
        self._baseline.pop(model, None)


def _spec(spec: CanarySpec, **changes: Any) -> CanarySpec:
    return replace(spec, **changes)


def _generation(spec: CanarySpec) -> tuple[Any, ...]:
    """What identifies one analysis window's conditions; a change starts a fresh window."""
    return (spec.canary, spec.started_at, spec.step_index, spec.failures)
