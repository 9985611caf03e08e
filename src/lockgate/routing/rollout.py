"""Progressive canary: analyse each interval's window, then advance, fail, roll back or pause.

Modelled on Argo Rollouts' analysis (interval, success conditions, failureLimit, an
inconclusive result), but evaluated inside the gateway against the gateway's own numbers,
including the governance module's drift status. Unlike Argo's inconclusive pause, a canary
paused for lack of evidence is re-judged on every tick and resumes by itself when the
evidence arrives; only an operator's pause waits for an operator.

* `WindowStats` / `TrafficStats` collect per-version request, error and latency numbers for
  the current analysis window (p99 over a bounded reservoir sample of latencies).
* Guardrails are objects (`Guardrail`: ``enabled``, ``unavailable``, ``evaluate``) in
  `GUARDRAILS`; `judge` runs them over one `Evidence` bundle. **Fail closed**: a guardrail
  whose evidence is missing is *inconclusive*, never passed, and one that could never be
  evaluated for a canary (drift without a reference profile) refuses the start. New
  guardrails (quality, fairness) register with `register_guardrail` and read their
  evidence from ``Evidence.extra``.
* `CanaryController` turns decisions into new policy snapshots (each revision + 1, each with
  one audit event, recorded before it takes effect), takes operator commands, latches drift
  alerts, and `run()` drives it on a clock so tests need no sleeping.

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

from lockgate.routing.changes import SYSTEM_ACTOR, GateFn, PersistFn, PolicyChanges
from lockgate.routing.policy import (
    CanarySpec,
    CanaryState,
    Guardrails,
    NoActiveCanary,
    PolicyBook,
    PolicyError,
    ShadowSpec,
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
    """What the controller's loop needs each tick (`TrafficStats` implements it).

    The loop peeks at the current window (a canary waiting for evidence keeps
    accumulating it) and resets the windows when the canary's conditions change.
    """

    def peek_window(self, model: str, version: str, now: float) -> VersionWindow: ...

    def reset_window(self, model: str, version: str, now: float) -> None: ...

    def peek_disagreement(self, model: str, stable: str, canary: str) -> DisagreementEvidence: ...

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

    def peek_window(self, model: str, version: str, now: float) -> VersionWindow:
        return self.window(model, version).peek(now)

    def reset_window(self, model: str, version: str, now: float) -> None:
        self.window(model, version).reset(now)

    def peek_disagreement(self, model: str, stable: str, canary: str) -> DisagreementEvidence:
        if self.agreements is None:
            return DisagreementEvidence(None, 0)
        compared, agreed = self.agreements.comparison(model, stable, canary)
        return DisagreementEvidence(1.0 - agreed / compared if compared else None, compared)

    def take_disagreement(self, model: str, stable: str, canary: str) -> float | None:
        if self.agreements is None:
            return None
        rate = self.agreements.disagreement(model, stable, canary)
        self.agreements.reset(model, stable, canary)
        return rate


# ---------------------------------------------------------------------------------- analysis
GuardrailStatus = Literal["pass", "fail", "inconclusive"]
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
    def inconclusive(self) -> tuple[GuardrailResult, ...]:
        return tuple(r for r in self.results if r.status == "inconclusive")

    @property
    def reason(self) -> str:
        picked = self.failed if self.outcome == "fail" else self.inconclusive
        return "; ".join(f"{r.name}: {r.detail}" for r in picked) or "all guardrails passed"


def drift_status_name(status: object) -> str | None:
    """Normalise a governance drift status (str or Enum) to lower-case text."""
    if status is None:
        return None
    value = status.value if isinstance(status, Enum) else status
    return str(value).strip().lower()


@dataclass(frozen=True, slots=True)
class DriftEvidence:
    """What governance says about the canary's inputs for this analysis.

    ``status`` is the status of the newest drift window evaluated since the canary
    started (None: none yet); ``unavailable`` says why drift cannot be evaluated for the
    canary version at all (no reference profile, drift disabled), None when it can.
    """

    status: str | None = None
    unavailable: str | None = None

    @classmethod
    def of(cls, value: object) -> DriftEvidence:
        return value if isinstance(value, DriftEvidence) else cls(drift_status_name(value))


@dataclass(frozen=True, slots=True)
class DisagreementEvidence:
    """Top-class disagreement between stable and canary over mirrored requests."""

    rate: float | None
    compared: int | None = None  # rows compared; None: unknown (counts as enough)

    @classmethod
    def of(cls, value: object) -> DisagreementEvidence:
        if isinstance(value, DisagreementEvidence):
            return value
        return cls(None if value is None else float(value))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Evidence:
    """Everything one analysis window offers the guardrails. A guardrail reads what it
    needs; evidence a future guardrail needs (quality, fairness) goes into ``extra`` under
    the guardrail's name, so adding one changes neither this class nor `analyse`."""

    guardrails: Guardrails
    stable: VersionWindow
    canary: VersionWindow
    baseline: VersionWindow | None = None
    drift: DriftEvidence = field(default_factory=DriftEvidence)
    disagreement: DisagreementEvidence = field(default_factory=lambda: DisagreementEvidence(None))
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def enough(self) -> bool:
        return self.canary.requests >= self.guardrails.min_requests

    @property
    def short(self) -> str:
        return f"{self.canary.requests} canary requests < min_requests {self.guardrails.min_requests}"

    @property
    def reference(self) -> VersionWindow | None:
        """The stable window to compare with (or the last conclusive baseline)."""
        g = self.guardrails
        reference = self.stable if self.stable.requests >= g.min_requests else self.baseline
        return reference if reference is not None and reference.requests >= g.min_requests else None

    @property
    def no_reference(self) -> str:
        return f"stable has {self.stable.requests} requests < min_requests {self.guardrails.min_requests} and no baseline"


@dataclass(frozen=True, slots=True)
class CanarySetup:
    """What a canary start can arrange for, or must check: guardrails answer from it."""

    model: str
    stable: str
    canary: str
    #: (model, version) -> why drift cannot be evaluated for it, or None.
    drift_unavailable: Callable[[str, str], str | None] | None = None


class Guardrail(Protocol):
    """One canary check. ``evaluate`` must return ``inconclusive`` (never ``pass``) when the
    evidence it needs is missing; ``unavailable`` names what makes it impossible to ever
    evaluate for this canary (the start is then refused, naming the fix)."""

    name: str

    def enabled(self, guardrails: Guardrails) -> bool: ...

    def unavailable(self, guardrails: Guardrails, setup: CanarySetup) -> str | None: ...

    def evaluate(self, evidence: Evidence) -> GuardrailResult | tuple[GuardrailResult, ...]: ...


class _Always:
    def unavailable(self, guardrails: Guardrails, setup: CanarySetup) -> str | None:
        return None


class DriftGuardrail(_Always):
    """Fails on DRIFT in the canary's inputs; needs a drift window evaluated since the start."""

    name = "drift"

    def enabled(self, g: Guardrails) -> bool:
        return g.fail_on_drift

    def unavailable(self, g: Guardrails, setup: CanarySetup) -> str | None:
        reason = setup.drift_unavailable(setup.model, setup.canary) if setup.drift_unavailable else None
        if reason is None:
            return None
        return (f"the drift guardrail cannot be evaluated for version {setup.canary} of model '{setup.model}': "
                f"{reason}; build a reference profile (`lockgate profile build`) or start with --ignore-drift")

    def evaluate(self, ev: Evidence) -> GuardrailResult:
        threshold = "not " + "/".join(sorted(FAILING_DRIFT_STATUSES))
        if ev.drift.unavailable is not None:
            return GuardrailResult(self.name, "inconclusive", None, threshold, f"cannot evaluate: {ev.drift.unavailable}")
        status = ev.drift.status
        if status is None:
            return GuardrailResult(self.name, "inconclusive", None, threshold,
                                   "no drift window of the canary evaluated since the canary started")
        if status in FAILING_DRIFT_STATUSES:
            return GuardrailResult(self.name, "fail", status, threshold, f"governance reports {status} on the canary's inputs")
        return GuardrailResult(self.name, "pass", status, threshold, f"latest drift window: {status}")


class ErrorRateGuardrail(_Always):
    name = "error_rate"

    def enabled(self, g: Guardrails) -> bool:
        return g.max_error_rate is not None

    def evaluate(self, ev: Evidence) -> GuardrailResult:
        g, canary = ev.guardrails, ev.canary
        limit = float(g.max_error_rate)  # type: ignore[arg-type]
        if ev.enough:
            ok = canary.error_rate <= limit
            return GuardrailResult(self.name, "pass" if ok else "fail", canary.error_rate, limit,
                                   f"{canary.errors}/{canary.requests} = {canary.error_rate:.4f} {'<=' if ok else '>'} {limit}")
        if canary.errors > limit * g.min_requests:  # one more request cannot redeem it
            return GuardrailResult(self.name, "fail", canary.errors / g.min_requests, limit,
                                   f"{canary.errors} errors already exceed the budget of {limit} over "
                                   f"min_requests {g.min_requests} ({canary.requests} requests so far)")
        return GuardrailResult(self.name, "inconclusive", canary.error_rate, limit, ev.short)


class _RatioGuardrail(_Always):
    """The canary's value may be at most ``ratio`` times stable's (floored, so a clean or
    very fast stable does not make a single error or a slow millisecond an infinite ratio);
    inconclusive while either value is missing."""

    name = ""
    value_field = ""  # the VersionWindow attribute compared
    ratio_field = ""
    floor_field = ""
    label, unit, digits = "", "", 4

    def value(self, window: VersionWindow) -> float | None:
        return getattr(window, self.value_field)

    def enabled(self, g: Guardrails) -> bool:
        return getattr(g, self.ratio_field) is not None

    def evaluate(self, ev: Evidence) -> GuardrailResult:
        g, reference = ev.guardrails, ev.reference
        ratio, floor = getattr(g, self.ratio_field), getattr(g, self.floor_field)
        measured = self.value(ev.canary)
        if not ev.enough or measured is None:
            return GuardrailResult(self.name, "inconclusive", measured, ratio, ev.short)
        baseline = self.value(reference) if reference is not None else None
        if baseline is None:
            return GuardrailResult(self.name, "inconclusive", measured, ratio, ev.no_reference)
        limit = float(ratio) * max(baseline, floor)
        ok = measured <= limit
        return GuardrailResult(self.name, "pass" if ok else "fail", measured, limit,
                               f"canary {self.label}{measured:.{self.digits}f}{self.unit} vs stable "
                               f"{self.label}{baseline:.{self.digits}f}{self.unit} (limit {ratio}x, floor {floor}{self.unit})")


class ErrorRatioGuardrail(_RatioGuardrail):
    name, value_field, ratio_field, floor_field = "error_ratio", "error_rate", "max_error_ratio", "error_rate_floor"


class P99RatioGuardrail(_RatioGuardrail):
    name, value_field, ratio_field, floor_field = "p99_ratio", "p99_ms", "max_p99_ratio", "p99_floor_ms"
    label, unit, digits = "p99 ", " ms", 3


class P99MsGuardrail(_Always):
    name = "p99_ms"

    def enabled(self, g: Guardrails) -> bool:
        return g.max_p99_ms is not None

    def evaluate(self, ev: Evidence) -> GuardrailResult:
        g, canary = ev.guardrails, ev.canary
        if not ev.enough or canary.p99_ms is None:
            return GuardrailResult(self.name, "inconclusive", canary.p99_ms, g.max_p99_ms, ev.short)
        ok = canary.p99_ms <= g.max_p99_ms  # type: ignore[operator]
        return GuardrailResult(self.name, "pass" if ok else "fail", canary.p99_ms, g.max_p99_ms,
                               f"canary p99 {canary.p99_ms:.3f} ms {'<=' if ok else '>'} {g.max_p99_ms} ms")


class DisagreementGuardrail:
    """Top-class disagreement with stable over mirrored requests. A canary start turns on
    mirroring of ``mirror_percent`` % of stable's requests to the canary (the policy's
    shadow) so that there is something to compare; without comparisons it is inconclusive."""

    name = "disagreement"

    def enabled(self, g: Guardrails) -> bool:
        return g.max_disagreement is not None

    def unavailable(self, g: Guardrails, setup: CanarySetup) -> str | None:
        if g.mirror_percent <= 0:
            return ("the disagreement guardrail needs mirrored requests: set mirror_percent > 0, "
                    "or disable max_disagreement")
        return None

    def evaluate(self, ev: Evidence) -> GuardrailResult:
        g, d = ev.guardrails, ev.disagreement
        if d.rate is None or (d.compared is not None and d.compared == 0):
            return GuardrailResult(self.name, "inconclusive", None, g.max_disagreement,
                                   "no mirrored comparisons between stable and canary in the window")
        if d.compared is not None and d.compared < g.min_comparisons:
            return GuardrailResult(self.name, "inconclusive", d.rate, g.max_disagreement,
                                   f"{d.compared} mirrored rows compared < min_comparisons {g.min_comparisons}")
        ok = d.rate <= g.max_disagreement  # type: ignore[operator]
        return GuardrailResult(self.name, "pass" if ok else "fail", d.rate, g.max_disagreement,
                               f"top-class disagreement with stable {d.rate:.4f} {'<=' if ok else '>'} {g.max_disagreement}"
                               + (f" over {d.compared} rows" if d.compared is not None else ""))


class OutcomeGuardrail(_Always):
    """Quality, fairness and label coverage of the canary against stable, judged by
    ``lockgate.outcomes`` (one verdict per metric) and handed over in
    ``Evidence.extra["outcomes"]``. Without that evidence -- no outcome evaluator in this
    process, or one that raised -- it is one inconclusive verdict, never a pass."""

    name = "outcomes"

    def enabled(self, g: Guardrails) -> bool:
        return g.uses_outcomes

    @classmethod
    def failed_to_evaluate(cls, exc: BaseException) -> tuple[GuardrailResult, ...]:
        return (GuardrailResult(cls.name, "inconclusive", None, None,
                                f"the outcome guardrails could not be evaluated ({type(exc).__name__}: {exc})"),)

    def evaluate(self, ev: Evidence) -> tuple[GuardrailResult, ...]:
        verdicts = ev.extra.get(self.name)
        if verdicts is None:
            return (GuardrailResult(self.name, "inconclusive", None, None, "no outcome evaluator in this process"),)
        if not verdicts:
            return (GuardrailResult(self.name, "inconclusive", None, None, "the outcome evaluator gave no verdict"),)
        return tuple(verdicts)


#: The guardrails every analysis runs, in order. `register_guardrail` adds one (e.g. a
#: quality or fairness check reading ``Evidence.extra``).
GUARDRAILS: list[Guardrail] = [
    DriftGuardrail(), ErrorRateGuardrail(), ErrorRatioGuardrail(), P99RatioGuardrail(), P99MsGuardrail(),
    DisagreementGuardrail(), OutcomeGuardrail(),
]


def register_guardrail(guardrail: Guardrail) -> None:
    """Add a guardrail to every analysis (its name must be new)."""
    if any(g.name == guardrail.name for g in GUARDRAILS):
        raise ValueError(f"a guardrail named {guardrail.name!r} exists already")
    GUARDRAILS.append(guardrail)


def unavailable_guardrails(guardrails: Guardrails, setup: CanarySetup) -> list[str]:
    """Why each enabled guardrail could never be evaluated for this canary ([] if all can)."""
    return [reason for g in GUARDRAILS if g.enabled(guardrails) and (reason := g.unavailable(guardrails, setup))]


def judge(evidence: Evidence) -> Analysis:
    """Run every enabled guardrail: fail beats inconclusive beats pass. Pure."""
    results: list[GuardrailResult] = []
    for guardrail in GUARDRAILS:
        if guardrail.enabled(evidence.guardrails):
            verdict = guardrail.evaluate(evidence)
            results.extend(verdict if isinstance(verdict, tuple) else (verdict,))
    statuses = {r.status for r in results}
    outcome: Outcome = "fail" if "fail" in statuses else "inconclusive" if "inconclusive" in statuses else "pass"
    return Analysis(outcome, tuple(results))


def analyse(
    guardrails: Guardrails,
    stable: VersionWindow,
    canary: VersionWindow,
    drift_status: object = None,
    disagreement: float | DisagreementEvidence | None = None,
    baseline: VersionWindow | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Analysis:
    """Judge one analysis window. Pure: same inputs, same verdict.

    Fail closed: a guardrail without the evidence it needs (no drift window evaluated, no
    mirrored comparison, too few requests) is inconclusive, never passed. Conclusive even
    with few requests: drift reported by governance, and a canary that has already failed
    more than its error budget over `min_requests`. Ratio guardrails compare with the
    stable window, or with `baseline` (the last conclusive stable window) when stable got
    too little traffic, e.g. at a 100 % step.
    """
    return judge(Evidence(guardrails, stable, canary, baseline, DriftEvidence.of(drift_status),
                          DisagreementEvidence.of(disagreement), dict(extra or {})))


# ---------------------------------------------------------------------------------- controller
ActionKind = Literal[
    "none", "started", "advanced", "failed", "rolled_back", "paused", "inconclusive", "waiting", "resumed",
    "promoted", "aborted",
]


@dataclass(frozen=True, slots=True)
class CanaryAction:
    """What one evaluation or operator command did (``waiting``: still inconclusive, nothing recorded)."""

    kind: ActionKind
    model: str
    policy: TrafficPolicy | None = None
    event: dict[str, Any] | None = None
    analysis: Analysis | None = None
    windows: Mapping[str, VersionWindow] = field(default_factory=dict)


def _canary_weights(spec: CanarySpec, percent: int) -> dict[str, int]:
    return {spec.stable: 100 - percent, spec.canary: percent}


def _without_mirror(policy: TrafficPolicy, spec: CanarySpec) -> ShadowSpec | None:
    """The policy's shadow once the canary ends: its mirror to the canary goes with it."""
    shadow = policy.shadow
    return None if shadow is not None and shadow.version == spec.canary else shadow


class CanaryController:
    """Drives every model's canary: analysis each interval, operator commands, drift alerts.

    State lives in the published `TrafficPolicy` (step, failures, state), so a restarted
    controller continues where the store says the canary is. Failures accumulate over the
    whole canary (a pass does not reset them), which is the conservative reading of
    `failure_limit`. Every decision goes through `PolicyChanges.commit`: it is recorded
    before it takes effect, or it is not taken (and retried on a later tick).
    """

    def __init__(
        self,
        book: PolicyBook,
        persist: PersistFn | None = None,
        *,
        servable: GateFn | None = None,
        changes: PolicyChanges | None = None,
        drift_unavailable: Callable[[str, str], str | None] | None = None,
    ) -> None:
        """
        Args:
            book: the live snapshots (shared with the `Router`).
            persist: records each change before it is published (see `PolicyChanges`).
            servable: (model, version) → approved to serve? Checked when a canary starts.
            changes: share one `PolicyChanges` with the admin API instead of `persist`/`servable`.
            drift_unavailable: (model, version) → why drift cannot be evaluated for it (no
                reference profile, ...), None when it can. None: assume it can.
        """
        self.changes = changes or PolicyChanges(book, persist, servable=servable)
        self.book = self.changes.book
        self.drift_unavailable = drift_unavailable
        self._drift: dict[tuple[str, str], tuple[str, float]] = {}
        self._baseline: dict[str, VersionWindow] = {}
        #: model → (analysis generation, due time) of the next evaluation.
        self._schedule: dict[str, tuple[tuple[Any, ...], float]] = {}
        #: model → reason of the latest inconclusive analysis (fresher than the recorded one).
        self._waiting: dict[str, str] = {}
        self.tick_errors = 0
        self._outcome_guardrails: OutcomeGuardrailsFn | None = None

    def set_outcome_guardrails(self, judge: OutcomeGuardrailsFn) -> None:
        """``judge(model, canary spec, now)`` returns the verdicts of the outcome guardrails
        (quality, fairness, label coverage; ``lockgate.outcomes``). Without one, a policy that
        sets them is inconclusive."""
        self._outcome_guardrails = judge

    # ---------------------------------------------------------------- governance hook
    def on_drift_alert(self, model: str, version: str, status: object, at: float | None = None) -> None:
        """Latch governance's latest drift status of a version; the next analysis reads it."""
        name = drift_status_name(status)
        if name is None:
            self._drift.pop((model, version), None)
        else:
            self._drift[(model, version)] = (name, time.time() if at is None else at)

    def drift_status(self, model: str, version: str) -> str | None:
        latched = self._drift.get((model, version))
        return latched[0] if latched is not None else None

    def drift_evidence(self, model: str, spec: CanarySpec) -> DriftEvidence:
        """The canary version's drift for this analysis: only windows evaluated since it started count."""
        unavailable = self.drift_unavailable(model, spec.canary) if self.drift_unavailable is not None else None
        latched = self._drift.get((model, spec.canary))
        status = latched[0] if latched is not None and latched[1] >= spec.started_at else None
        return DriftEvidence(status, unavailable)

    def waiting_reason(self, model: str) -> str | None:
        """Why the canary of `model` is still inconclusive, as of the latest tick."""
        return self._waiting.get(model)

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
        the split, so the analysis compares exactly two versions. A guardrail that could
        never be evaluated refuses the start (`GuardrailUnavailable`); the disagreement
        guardrail sets up what it needs: ``mirror_percent`` % of stable's requests are
        mirrored to the canary while it runs.
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
        g = guardrails or Guardrails()
        spec = CanarySpec(
            stable=stable,
            canary=canary,
            steps=tuple(steps),
            interval_s=interval_s,
            guardrails=g,
            failure_limit=failure_limit,
            started_at=now,
        )
        problems = unavailable_guardrails(g, CanarySetup(model, stable, canary, self.drift_unavailable))
        if problems:
            raise GuardrailUnavailable("; ".join(problems))
        shadow = old.shadow if old is not None else None
        if shadow is not None and shadow.version == canary:
            shadow = None
        if g.max_disagreement is not None:
            if shadow is not None:
                raise GuardrailUnavailable(
                    f"model '{model}' mirrors to version {shadow.version}; the disagreement guardrail needs the mirror "
                    f"for canary {canary}: remove the shadow first, or disable max_disagreement")
            shadow = ShadowSpec(version=canary, percent=g.mirror_percent)
        weights = _canary_weights(spec, spec.percent)
        if old is None:
            new = TrafficPolicy(model=model, revision=1, weights=weights, canary=spec, shadow=shadow)
        else:
            new = old.evolve(weights=weights, canary=spec, shadow=shadow)
        details: dict[str, Any] = {"canary": canary, "stable": stable, "percent": spec.percent}
        if shadow is not None and shadow.version == canary:
            details["mirror_percent"] = shadow.percent
        event = self.changes.commit(old, new, "traffic.canary.started", actor, details)
        self._forget(model)
        return CanaryAction("started", model, new, event)

    def promote(self, model: str, *, actor: str, reason: str = "promoted by operator") -> CanaryAction:
        """Give the canary 100 % now; it becomes the stable version."""
        old, spec = self._active(model)
        new = old.evolve(
            weights={spec.canary: 100},
            canary=_spec(spec, state=CanaryState.PROMOTED, reason=reason),
            shadow=_without_mirror(old, spec),
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
        new = old.evolve(weights={spec.stable: 100}, canary=_spec(spec, state=CanaryState.ABORTED, reason=reason),
                         shadow=_without_mirror(old, spec))
        event = self.changes.commit(
            old, new, "traffic.canary.aborted", actor, {"canary": spec.canary, "stable": spec.stable, "reason": reason}
        )
        self._forget(model)
        return CanaryAction("aborted", model, new, event)

    def pause(self, model: str, *, actor: str, reason: str = "paused by operator") -> CanaryAction:
        """Hold the current step (traffic split unchanged) until an operator resumes it."""
        old, spec = self._active(model)
        if spec.state is CanaryState.PAUSED:
            return CanaryAction("none", model, old)
        new = old.evolve(canary=_spec(spec, state=CanaryState.PAUSED, reason=reason))
        event = self.changes.commit(old, new, "traffic.canary.paused", actor, {"canary": spec.canary, "reason": reason})
        self._schedule.pop(model, None)
        self._waiting.pop(model, None)
        return CanaryAction("paused", model, new, event)

    def resume(self, model: str, *, actor: str) -> CanaryAction:
        """Continue a paused (or still inconclusive) canary; its next analysis window starts now."""
        old, spec = self._active(model)
        if spec.state is CanaryState.PROGRESSING:
            return CanaryAction("none", model, old)
        new = old.evolve(canary=_spec(spec, state=CanaryState.PROGRESSING, reason=None))
        event = self.changes.commit(old, new, "traffic.canary.resumed", actor, {"canary": spec.canary, "was": spec.reason})
        self._schedule.pop(model, None)
        self._waiting.pop(model, None)
        return CanaryAction("resumed", model, new, event)

    # ---------------------------------------------------------------- analysis
    def evaluate(
        self,
        model: str,
        now: float,
        stats_stable: VersionWindow,
        stats_canary: VersionWindow,
        drift_status_canary: object = None,
        disagreement: float | DisagreementEvidence | None = None,
    ) -> CanaryAction:
        """Judge the window of a progressing (or inconclusive) canary and record the consequence.

        `drift_status_canary` defaults to the status latched by `on_drift_alert` since the
        canary started. An inconclusive window moves a progressing canary to
        ``inconclusive`` (recorded once, with the evidence); while it stays inconclusive
        nothing more is recorded; a conclusive window then resumes it (advance, failure,
        rollback, promotion), with ``resumed_from: inconclusive`` in the evidence.
        """
        old = self.book.get(model)
        if old is None or old.canary is None or not old.canary.state.analysed:
            return CanaryAction("none", model, old)
        spec = old.canary
        drift = (self.drift_evidence(model, spec) if drift_status_canary is None
                 else DriftEvidence.of(drift_status_canary))
        g = spec.guardrails
        if stats_stable.requests >= g.min_requests:
            self._baseline[model] = stats_stable
        extra: dict[str, Any] = {}
        if g.uses_outcomes and self._outcome_guardrails is not None:
            try:
                extra[OutcomeGuardrail.name] = tuple(self._outcome_guardrails(model, spec, now))
            except Exception as exc:  # a guardrail that cannot be evaluated is inconclusive, never passed
                log.exception("outcome guardrails of %s could not be evaluated", model)
                extra[OutcomeGuardrail.name] = OutcomeGuardrail.failed_to_evaluate(exc)
        analysis = judge(Evidence(g, stats_stable, stats_canary, self._baseline.get(model), drift,
                                  DisagreementEvidence.of(disagreement), extra))
        windows = {"stable": stats_stable, "canary": stats_canary}
        if analysis.outcome == "inconclusive" and spec.state is CanaryState.INCONCLUSIVE:
            self._waiting[model] = analysis.reason
            return CanaryAction("waiting", model, old, None, analysis, windows)
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
        if spec.state is CanaryState.INCONCLUSIVE:
            evidence.update(resumed_from="inconclusive", waited_for=spec.reason)
        kind: ActionKind
        progressing = _spec(spec, state=CanaryState.PROGRESSING, reason=None)
        if analysis.outcome == "pass":
            if spec.last_step:
                kind, action = "promoted", "traffic.canary.promoted"
                new = old.evolve(weights={spec.canary: 100}, shadow=_without_mirror(old, spec),
                                 canary=_spec(spec, state=CanaryState.PROMOTED, reason="all steps passed"))
                evidence.update(previous_stable=spec.stable, new_stable=spec.canary)
            else:
                kind, action = "advanced", "traffic.canary.advanced"
                nxt = _spec(progressing, step_index=spec.step_index + 1)
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
                    weights={spec.stable: 100}, shadow=_without_mirror(old, spec),
                    canary=_spec(spec, failures=failures, state=CanaryState.ROLLED_BACK, reason=analysis.reason),
                )
            else:
                kind, action = "failed", "traffic.canary.analysis_failed"
                new = old.evolve(canary=_spec(progressing, failures=failures, reason=analysis.reason))
        else:
            kind, action = "inconclusive", "traffic.canary.inconclusive"
            evidence.update(reason=analysis.reason)
            new = old.evolve(canary=_spec(spec, state=CanaryState.INCONCLUSIVE, reason=f"inconclusive: {analysis.reason}"))
        event = self.changes.commit(old, new, action, SYSTEM_ACTOR, evidence)
        if kind == "inconclusive":
            self._waiting[model] = analysis.reason
        else:
            self._waiting.pop(model, None)
        canary_spec = new.canary
        if canary_spec is not None and canary_spec.state is CanaryState.PROGRESSING:
            self._schedule[model] = (_generation(canary_spec), now + canary_spec.interval_s)
        elif canary_spec is None or not canary_spec.state.active:
            self._forget(model)
        return CanaryAction(kind, model, new, event, analysis, windows)

    def tick(self, now: float, stats: StatsProvider) -> list[CanaryAction]:
        """Evaluate every progressing canary whose interval has elapsed, and every canary
        waiting for evidence (inconclusive) on each tick.

        A canary seen for the first time at its current step (or after a failure, a resume
        or a restart) starts a fresh window now: numbers from the previous split must not
        judge the new one. While a canary waits for evidence its window keeps growing.
        """
        actions: list[CanaryAction] = []
        for model, policy in self.book.items():
            spec = policy.canary
            if spec is None or not spec.state.analysed:
                self._schedule.pop(model, None)
                self._waiting.pop(model, None)
                continue
            gen = _generation(spec)
            scheduled = self._schedule.get(model)
            if scheduled is None or scheduled[0] != gen:
                self._schedule[model] = (gen, now + spec.interval_s)
                stats.reset_window(model, spec.stable, now)
                stats.reset_window(model, spec.canary, now)
                stats.take_disagreement(model, spec.stable, spec.canary)
                continue
            if spec.state is CanaryState.PROGRESSING and now < scheduled[1]:
                continue
            try:
                stable = stats.peek_window(model, spec.stable, now)
                canary = stats.peek_window(model, spec.canary, now)
                disagreement = stats.peek_disagreement(model, spec.stable, spec.canary)
                action = self.evaluate(model, now, stable, canary, None, disagreement)
                actions.append(action)
                if action.kind in ("advanced", "failed"):  # judged: the next window starts now
                    stats.reset_window(model, spec.stable, now)
                    stats.reset_window(model, spec.canary, now)
                    stats.take_disagreement(model, spec.stable, spec.canary)
            except Exception:  # one model's bad numbers (or a refused commit) must not stop the others
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
        """Background loop: `tick` every `tick_s` until `stop` is set (or the task is cancelled).

        Each tick runs in a worker thread: a decision commits to the store (an fsync) before
        it takes effect, and that must not stall the event loop serving requests.
        """
        while stop is None or not stop.is_set():
            try:
                await asyncio.to_thread(self.tick, clock(), stats)
            except Exception:
                self.tick_errors += 1
                log.exception("canary controller tick failed")
            await sleep(tick_s)

    # ---------------------------------------------------------------- helpers
    def _active(self, model: str) -> tuple[TrafficPolicy, CanarySpec]:
        policy = self.book.get(model)
        if policy is None or policy.canary is None or not policy.canary.state.active:
            raise NoActiveCanary(f"model '{model}' has no canary in progress")
        return policy, policy.canary

    def _forget(self, model: str) -> None:
        self._schedule.pop(model, None)
        self._baseline.pop(model, None)
        self._waiting.pop(model, None)


class GuardrailUnavailable(PolicyError):
    """A canary start with a guardrail that could never be evaluated (fail closed)."""

    code = "FAILED_PRECONDITION"
    reason = "guardrail_unavailable"


def _spec(spec: CanarySpec, **changes: Any) -> CanarySpec:
    return replace(spec, **changes)


def _generation(spec: CanarySpec) -> tuple[Any, ...]:
    """What identifies one analysis window's conditions; a change starts a fresh window."""
    return (spec.canary, spec.started_at, spec.step_index, spec.failures)
