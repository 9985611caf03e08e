"""Unit tests for routing.rollout and routing.changes: windows, guardrails, the canary state machine."""

from __future__ import annotations

import asyncio
import random
from enum import Enum
from typing import Any

import numpy as np
import pytest

from lockgate.routing import (
    AgreementBook,
    CanaryController,
    CanaryState,
    Guardrails,
    NotServable,
    PolicyBook,
    PolicyChanges,
    PolicyError,
    Router,
    TrafficPolicy,
    TrafficStats,
    VersionWindow,
    WindowStats,
    analyse,
)
from lockgate.routing.changes import SYSTEM_ACTOR
from lockgate.routing.policy import NoActiveCanary, ShadowSpec
from lockgate.routing.rollout import (
    GUARDRAILS,
    CanarySetup,
    DisagreementEvidence,
    DriftEvidence,
    Evidence,
    GuardrailResult,
    GuardrailUnavailable,
    register_guardrail,
)

ALL = lambda version: True  # noqa: E731


class Recorder:
    """Collects (event, policy) pairs the way the lead's audit/persist callback would."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.policies: list[TrafficPolicy] = []

    def __call__(self, event: dict[str, Any], policy: TrafficPolicy, old: TrafficPolicy | None = None) -> None:
        self.events.append(event)
        self.policies.append(policy)

    @property
    def actions(self) -> list[str]:
        return [e["action"] for e in self.events]


def setup(min_requests: int = 50, failure_limit: int = 2, **guard: Any) -> tuple[PolicyBook, CanaryController, Recorder]:
    """A canary of version 2 at 5 %; drift latched OK and disagreement off unless asked for,
    so that these tests judge the other guardrails (fail-closed ones have their own)."""
    book = PolicyBook()
    rec = Recorder()
    book.replace(TrafficPolicy("m", 1, {"1": 100}))
    ctl = CanaryController(book, rec)
    guard.setdefault("max_disagreement", None)
    ctl.on_drift_alert("m", "2", "ok")
    ctl.start(
        "m",
        "2",
        actor="alice",
        now=0.0,
        steps=(5, 25, 50, 100),
        interval_s=10.0,
        guardrails=Guardrails(min_requests=min_requests, **guard),
        failure_limit=failure_limit,
    )
    return book, ctl, rec


def window(version: str, requests: int, errors: int = 0, p99: float | None = 10.0) -> VersionWindow:
    return VersionWindow(version, requests, errors, p99 if requests else None)


def assert_revisions_bump(rec: Recorder) -> None:
    revisions = [p.revision for p in rec.policies]
    assert revisions == list(range(revisions[0], revisions[0] + len(revisions)))
    for event, policy in zip(rec.events, rec.policies):
        assert event["subject"] == "m" and event["details"]["revision"] == policy.revision
        assert event["details"]["policy"] == policy.to_dict()
        assert set(event) == {"action", "subject", "actor", "details"}


# ------------------------------------------------------------------------------------ windows
def test_window_stats_p99_and_reset() -> None:
    stats = WindowStats("1")
    rng = np.random.default_rng(3)
    samples = rng.exponential(5.0, 20_000)
    for i, latency in enumerate(samples):
        stats.record(float(latency), ok=i % 50 != 0)
    snap = stats.take(now=12.0)
    assert snap.requests == 20_000 and snap.errors == 400 and snap.error_rate == pytest.approx(0.02)
    assert snap.p99_ms == pytest.approx(float(np.percentile(samples, 99)), rel=0.08)
    assert snap.ended_at == 12.0
    empty = stats.peek()
    assert (empty.requests, empty.errors, empty.p99_ms, empty.started_at) == (0, 0, None, 12.0)
    # Below the sample capacity the p99 is exact.
    small = samples[:1000]
    for latency in small:
        stats.record(float(latency), ok=True)
    assert stats.take().p99_ms == pytest.approx(float(np.percentile(small, 99)))


def test_traffic_stats_disagreement_window() -> None:
    agreements = AgreementBook()
    stats = TrafficStats(agreements)
    stats.record("m", "1", 3.0, True)
    assert stats.take_window("m", "1", 1.0).requests == 1
    assert stats.take_disagreement("m", "1", "2") is None
    agreements.record("m", "1", "2", {"y": np.eye(2)}, {"y": np.eye(2)[::-1]})
    assert stats.take_disagreement("m", "1", "2") == pytest.approx(1.0)
    assert stats.take_disagreement("m", "1", "2") is None  # taken = reset


# ------------------------------------------------------------------------------------ analyse
def test_analyse_pass_fail_inconclusive() -> None:
    g = Guardrails(min_requests=100, max_error_rate=0.05, max_error_ratio=2.0, max_p99_ratio=1.5, max_p99_ms=100.0)
    ok = analyse(g, window("1", 1000, 5, 10.0), window("2", 200, 1, 12.0), "ok", 0.01)
    assert ok.outcome == "pass", ok.reason
    assert {r.name for r in ok.results} == {"drift", "error_rate", "error_ratio", "p99_ratio", "p99_ms", "disagreement"}
    slow = analyse(g, window("1", 1000, 5, 10.0), window("2", 200, 1, 16.0))
    assert slow.outcome == "fail" and [r.name for r in slow.failed] == ["p99_ratio"]
    assert slow.failed[0].observed == 16.0 and slow.failed[0].threshold == pytest.approx(15.0)
    errors = analyse(g, window("1", 1000, 5), window("2", 200, 9))
    assert [r.name for r in errors.failed] == ["error_ratio"]  # 4.5 % < 5 % but > 2 x 0.5 %
    few = analyse(g, window("1", 1000), window("2", 20))
    assert few.outcome == "inconclusive" and "20 canary requests < min_requests 100" in few.reason
    budget = analyse(g, window("1", 1000), window("2", 20, 6))
    assert budget.outcome == "fail" and budget.failed[0].name == "error_rate"
    drift = analyse(g, window("1", 1000), window("2", 3), "DRIFT")
    assert drift.outcome == "fail" and drift.failed[0].name == "drift"
    disagree = analyse(g, window("1", 1000), window("2", 200), None, 0.2)
    assert [r.name for r in disagree.failed] == ["disagreement"]
    no_ref = analyse(g, window("1", 10), window("2", 200))
    assert no_ref.outcome == "inconclusive" and "no baseline" in no_ref.reason
    with_baseline = analyse(g, window("1", 10), window("2", 200), "ok", 0.01, baseline=window("1", 500))
    assert with_baseline.outcome == "pass"


def test_a_guardrail_without_evidence_is_inconclusive_never_passed() -> None:
    """Issue 15 §7: 'no drift reported' and 'no mirrored comparisons' used to pass."""
    g = Guardrails(min_requests=100, max_disagreement=0.1)
    healthy = (window("1", 1000, 5, 10.0), window("2", 200, 1, 11.0))
    no_drift = analyse(g, *healthy, None, 0.01)
    assert no_drift.outcome == "inconclusive" and [r.name for r in no_drift.inconclusive] == ["drift"]
    assert "no drift window" in no_drift.reason
    no_profile = analyse(g, *healthy, DriftEvidence(None, "no reference profile"), 0.01)
    assert no_profile.outcome == "inconclusive" and "no reference profile" in no_profile.reason
    no_mirror = analyse(g, *healthy, "ok", None)
    assert no_mirror.outcome == "inconclusive" and [r.name for r in no_mirror.inconclusive] == ["disagreement"]
    assert "no mirrored comparisons" in no_mirror.reason
    nothing_compared = analyse(g, *healthy, "ok", DisagreementEvidence(None, 0))
    assert nothing_compared.outcome == "inconclusive"
    few = analyse(g, *healthy, "ok", DisagreementEvidence(0.0, 10))
    assert few.outcome == "inconclusive" and "10 mirrored rows compared < min_comparisons 50" in few.reason
    assert analyse(g, *healthy, "ok", DisagreementEvidence(0.79, 400)).failed[0].name == "disagreement"
    assert analyse(g, *healthy, "ok", DisagreementEvidence(0.02, 400)).outcome == "pass"
    assert all(r.status != "skipped" for r in no_mirror.results)


def test_guardrails_are_an_extensible_set() -> None:
    """A new guardrail (quality, fairness) registers and reads its evidence from Evidence.extra."""

    class Quality:
        name = "quality"

        def enabled(self, g: Guardrails) -> bool:
            return True

        def unavailable(self, g: Guardrails, setup: CanarySetup) -> str | None:
            return None

        def evaluate(self, ev: Evidence) -> GuardrailResult:
            accuracy = ev.extra.get("quality")
            if accuracy is None:
                return GuardrailResult(self.name, "inconclusive", None, 0.9, "no labelled outcomes yet")
            return GuardrailResult(self.name, "pass" if accuracy >= 0.9 else "fail", accuracy, 0.9, "")

    register_guardrail(Quality())
    try:
        g = Guardrails(min_requests=1, max_disagreement=None)
        assert analyse(g, window("1", 10), window("2", 10), "ok").outcome == "inconclusive"
        assert analyse(g, window("1", 10), window("2", 10), "ok", extra={"quality": 0.95}).outcome == "pass"
        assert analyse(g, window("1", 10), window("2", 10), "ok", extra={"quality": 0.5}).failed[0].name == "quality"
        with pytest.raises(ValueError):
            register_guardrail(Quality())
    finally:
        GUARDRAILS[:] = [x for x in GUARDRAILS if x.name != "quality"]


def test_analyse_accepts_enum_drift_status_and_disabled_guardrails() -> None:
    class Status(Enum):
        DRIFT = "drift"

    g = Guardrails(min_requests=1, max_error_rate=None, max_p99_ratio=None, max_disagreement=None, fail_on_drift=False)
    assert analyse(g, window("1", 0), window("2", 5, 5), Status.DRIFT).outcome == "pass"
    g2 = Guardrails(min_requests=1)
    assert analyse(g2, window("1", 10), window("2", 10), Status.DRIFT).outcome == "fail"


def test_guardrails_validation() -> None:
    with pytest.raises(PolicyError):
        Guardrails(max_error_rate=2.0)
    with pytest.raises(PolicyError):
        Guardrails(min_requests=0)
    with pytest.raises(PolicyError):
        Guardrails(max_p99_ratio=0)


# ------------------------------------------------------------------------------------ controller
def test_all_pass_advances_through_steps_to_promoted() -> None:
    book, ctl, rec = setup()
    assert book.get("m").weights == {"1": 95, "2": 5}
    percents = []
    for t in range(1, 5):
        action = ctl.evaluate("m", 10.0 * t, window("1", 1000), window("2", 100))
        percents.append(book.get("m").percent_of("2"))
        assert action.policy is book.get("m")
    assert percents == [25, 50, 100, 100]
    final = book.get("m")
    assert final.weights == {"2": 100} and final.canary.state is CanaryState.PROMOTED
    assert rec.actions == ["traffic.canary.started"] + ["traffic.canary.advanced"] * 3 + ["traffic.canary.promoted"]
    assert rec.events[0]["actor"] == "alice" and rec.events[-1]["actor"] == SYSTEM_ACTOR
    assert rec.events[-1]["details"]["new_stable"] == "2"
    assert_revisions_bump(rec)
    # Once promoted, evaluation is a no-op and emits nothing.
    assert ctl.evaluate("m", 60.0, window("1", 0), window("2", 100)).kind == "none"
    assert len(rec.events) == 5


@pytest.mark.parametrize(
    ("case", "canary_window", "drift", "guardrail"),
    [
        ("errors", window("2", 100, 100), None, "error_rate"),
        ("slow", window("2", 100, 0, 80.0), None, "p99_ratio"),
        ("drift", window("2", 100), "drift", "drift"),
    ],
)
def test_failing_canary_rolls_back_after_failure_limit(
    case: str, canary_window: VersionWindow, drift: str | None, guardrail: str
) -> None:
    book, ctl, rec = setup(failure_limit=3)
    if drift:
        ctl.on_drift_alert("m", "2", drift)
        ctl.on_drift_alert("m", "1", "ok")
    kinds = []
    for t in range(1, 4):
        kinds.append(ctl.evaluate("m", 10.0 * t, window("1", 1000, 0, 10.0), canary_window).kind)
        if t < 3:
            assert book.get("m").weights == {"1": 95, "2": 5}  # held at the step, not advanced
            assert book.get("m").canary.failures == t
    assert kinds == ["failed", "failed", "rolled_back"]
    final = book.get("m")
    assert final.weights == {"1": 100} and final.canary.state is CanaryState.ROLLED_BACK
    assert guardrail in (final.canary.reason or "")
    rollback = rec.events[-1]
    assert rollback["action"] == "traffic.canary.rolled_back" and rollback["actor"] == SYSTEM_ACTOR
    evidence = rollback["details"]
    assert evidence["guardrail"] == guardrail and evidence["failures"] == 3 and evidence["failure_limit"] == 3
    assert evidence["observed"] is not None and evidence["threshold"] is not None
    assert evidence["window"]["canary"]["requests"] == 100 and evidence["window"]["interval_s"] == 10.0
    assert any(g["guardrail"] == guardrail and g["status"] == "fail" for g in evidence["guardrails"])
    assert rec.actions.count("traffic.canary.analysis_failed") == 2
    assert_revisions_bump(rec)


def test_lack_of_evidence_pauses_and_resumes_by_itself() -> None:
    """Issue 15 §8: an automatic pause for lack of evidence resumes when the evidence arrives."""
    book, ctl, rec = setup(min_requests=50)
    action = ctl.evaluate("m", 10.0, window("1", 1000), window("2", 0))
    assert action.kind == "inconclusive"
    assert book.get("m").canary.state is CanaryState.INCONCLUSIVE and book.get("m").weights == {"1": 95, "2": 5}
    assert "0 canary requests < min_requests 50" in book.get("m").canary.reason
    waiting = ctl.evaluate("m", 11.0, window("1", 1000), window("2", 30))  # still short: nothing recorded
    assert waiting.kind == "waiting" and len(rec.events) == 2
    assert "30 canary requests" in (ctl.waiting_reason("m") or "")  # the live reason, never stale
    resumed = ctl.evaluate("m", 12.0, window("1", 1000), window("2", 60))
    assert resumed.kind == "advanced" and book.get("m").canary.state is CanaryState.PROGRESSING
    assert rec.events[-1]["details"]["resumed_from"] == "inconclusive"
    assert rec.actions == ["traffic.canary.started", "traffic.canary.inconclusive", "traffic.canary.advanced"]
    assert_revisions_bump(rec)


def test_an_operator_pause_waits_for_the_operator() -> None:
    book, ctl, rec = setup(min_requests=50)
    ctl.pause("m", actor="bob", reason="investigating")
    assert ctl.evaluate("m", 20.0, window("1", 1000), window("2", 100)).kind == "none"  # paused: no analysis
    ctl.resume("m", actor="bob")
    assert book.get("m").canary.state is CanaryState.PROGRESSING
    assert ctl.evaluate("m", 30.0, window("1", 1000), window("2", 100)).kind == "advanced"
    assert rec.actions[1:] == ["traffic.canary.paused", "traffic.canary.resumed", "traffic.canary.advanced"]
    assert rec.events[1]["actor"] == "bob"
    assert_revisions_bump(rec)


def test_canary_start_refuses_a_guardrail_that_cannot_be_evaluated() -> None:
    book = PolicyBook()
    book.replace(TrafficPolicy("m", 1, {"1": 100}))
    ctl = CanaryController(book, drift_unavailable=lambda m, v: "version 2 has no reference profile")
    with pytest.raises(GuardrailUnavailable, match="no reference profile.*--ignore-drift") as info:
        ctl.start("m", "2", actor="a")
    assert info.value.code == "FAILED_PRECONDITION" and book.get("m").revision == 1
    with pytest.raises(GuardrailUnavailable, match="mirror_percent"):
        ctl.start("m", "2", actor="a", guardrails=Guardrails(fail_on_drift=False, mirror_percent=0))
    ctl.start("m", "2", actor="a", guardrails=Guardrails(fail_on_drift=False, max_disagreement=None))
    assert book.get("m").shadow is None


def test_disagreement_turns_on_mirroring_for_the_canary_and_off_after() -> None:
    book = PolicyBook()
    book.replace(TrafficPolicy("m", 1, {"1": 100}, shadow=ShadowSpec("3", 20)))
    ctl = CanaryController(book)
    with pytest.raises(GuardrailUnavailable, match="mirrors to version 3"):
        ctl.start("m", "2", actor="a", guardrails=Guardrails(max_disagreement=0.1))
    book.replace(book.get("m").evolve(shadow=None))
    ctl.start("m", "2", actor="a", guardrails=Guardrails(max_disagreement=0.1, mirror_percent=15))
    assert book.get("m").shadow == ShadowSpec("2", 15)
    ctl.abort("m", actor="a")
    assert book.get("m").shadow is None


def test_operator_promote_and_abort_at_any_time() -> None:
    book, ctl, rec = setup()
    ctl.promote("m", actor="carol")
    assert book.get("m").weights == {"2": 100} and book.get("m").canary.state is CanaryState.PROMOTED
    with pytest.raises(NoActiveCanary, match="no canary in progress") as info:
        ctl.abort("m", actor="carol")
    assert info.value.code == "FAILED_PRECONDITION"  # issue 15 §9: not INVALID_ARGUMENT

    book2, ctl2, rec2 = setup()
    ctl2.evaluate("m", 10.0, window("1", 1000), window("2", 100))  # now at 25 %
    ctl2.pause("m", actor="dave")
    ctl2.abort("m", actor="dave", reason="bad smell")
    final = book2.get("m")
    assert final.weights == {"1": 100} and final.canary.state is CanaryState.ABORTED and final.canary.reason == "bad smell"
    assert rec2.actions == [
        "traffic.canary.started",
        "traffic.canary.advanced",
        "traffic.canary.paused",
        "traffic.canary.aborted",
    ]
    assert rec2.events[-1]["actor"] == "dave"
    assert_revisions_bump(rec)
    assert_revisions_bump(rec2)


def test_start_validation_and_gates() -> None:
    book = PolicyBook()
    book.replace(TrafficPolicy("m", 1, {"1": 50, "3": 50}))
    approved = {"1", "3"}
    ctl = CanaryController(book, servable=lambda m, v: v in approved)
    with pytest.raises(PolicyError, match="2 live versions"):
        ctl.start("m", "2", actor="a")
    with pytest.raises(NotServable, match="version 2 of model 'm' is not approved"):
        ctl.start("m", "2", actor="a", stable="1")
    approved.add("2")
    ctl.start("m", "2", actor="a", stable="1", steps=[10, 100])
    assert book.get("m").weights == {"1": 90, "2": 10}
    with pytest.raises(PolicyError, match="already has a canary"):
        ctl.start("m", "3", actor="a", stable="1")
    with pytest.raises(PolicyError, match="in progress"):
        ctl.changes.set_weights("m", {"1": 100}, actor="a")


def test_policy_changes_set_weights_and_shadow() -> None:
    book = PolicyBook()
    rec = Recorder()
    states = {"1": "approved", "2": "approved", "3": "validated"}
    changes = PolicyChanges(
        book,
        rec,
        servable=lambda m, v: states.get(v) == "approved",
        shadowable=lambda m, v: states.get(v) in ("approved", "validated"),
    )
    changes.set_weights("m", {"1": 90, "2": 10}, actor="op")
    with pytest.raises(NotServable):
        changes.set_weights("m", {"1": 90, "3": 10}, actor="op")
    changes.set_shadow("m", "3", 25, actor="op")
    with pytest.raises(PolicyError, match="already takes live traffic"):
        changes.set_shadow("m", "2", 25, actor="op")
    changes.set_weights("m", {"1": 100}, actor="op", sticky=False)
    assert book.get("m").shadow.version == "3" and book.get("m").sticky is False
    changes.clear_shadow("m", actor="op")
    assert book.get("m").shadow is None
    assert rec.actions == ["traffic.set", "traffic.shadow", "traffic.set", "traffic.shadow_cleared"]
    assert rec.events[0]["details"]["previous_revision"] is None
    assert_revisions_bump(rec)


def test_a_change_that_cannot_be_recorded_never_goes_live() -> None:
    """Issue 15 §3: persist first; a failure refuses the change (the old code published it)."""
    book = PolicyBook()
    recorded: list[int] = []

    def persist(event: dict[str, Any], policy: TrafficPolicy, old: TrafficPolicy | None) -> None:
        if len(recorded) == 1:
            raise RuntimeError("disk full")
        assert book.get("m") is old  # not published yet while it is being recorded
        recorded.append(policy.revision)

    changes = PolicyChanges(book, persist)
    changes.set_weights("m", {"1": 100}, actor="op")
    with pytest.raises(RuntimeError, match="disk full"):
        changes.set_weights("m", {"1": 30, "2": 70}, actor="op")
    assert book.get("m").weights == {"1": 100} and book.get("m").revision == 1 and changes.refused == 1
    recorded.append(0)  # recording works again: the next change takes the next revision, never a reused one
    changes.set_weights("m", {"1": 30, "2": 70}, actor="op")
    assert book.get("m").revision == 2 and recorded == [1, 0, 2]


def test_a_failing_listener_cannot_undo_a_recorded_change() -> None:
    book = PolicyBook()
    changes = PolicyChanges(book, Recorder())

    def broken(event: dict[str, Any], policy: TrafficPolicy, old: TrafficPolicy | None) -> None:
        raise RuntimeError("metrics down")

    changes.published.append(broken)
    changes.set_weights("m", {"1": 100}, actor="op")
    assert changes.listener_failures == 1 and book.get("m").revision == 1


# ------------------------------------------------------------------------------------ the loop
class Sim:
    """Routes simulated traffic through the real Router and records outcomes per version."""

    def __init__(self, book: PolicyBook, stats: TrafficStats, behaviour: dict[str, tuple[float, float]]) -> None:
        self.router = Router(book)
        self.stats = stats
        self.behaviour = behaviour  # version → (error probability, latency ms)
        self.rng = random.Random(11)
        self.n = 0

    def traffic(self, requests: int) -> None:
        for _ in range(requests):
            self.n += 1
            version = self.router.route("m", "", None, f"r{self.n}", ALL).version
            p_err, latency = self.behaviour[version]
            ok = self.rng.random() >= p_err
            self.stats.record("m", version, latency * (0.8 + 0.4 * self.rng.random()), ok)


def drive(ctl: CanaryController, sim: Sim, seconds: float, per_tick: int = 60) -> None:
    """Run the real async loop with a fake clock; each fake second carries `per_tick` requests."""
    clock = [100.0]
    stop = asyncio.Event()

    async def fake_sleep(dt: float) -> None:
        sim.traffic(per_tick)
        clock[0] += dt
        if clock[0] >= 100.0 + seconds:
            stop.set()
        await asyncio.sleep(0)

    asyncio.run(ctl.run(sim.stats, clock=lambda: clock[0], sleep=fake_sleep, tick_s=1.0, stop=stop))


def loop_setup(behaviour: dict[str, tuple[float, float]], **guard: Any) -> tuple[PolicyBook, CanaryController, Recorder, Sim]:
    book = PolicyBook()
    rec = Recorder()
    book.replace(TrafficPolicy("m", 1, {"1": 100}))
    ctl = CanaryController(book, rec)
    guard.setdefault("max_disagreement", None)
    ctl.on_drift_alert("m", "2", "ok")
    ctl.start("m", "2", actor="alice", now=100.0, steps=(10, 50, 100), interval_s=10.0,
              guardrails=Guardrails(min_requests=30, **guard), failure_limit=2)
    return book, ctl, rec, Sim(book, TrafficStats(AgreementBook()), behaviour)


def test_run_loop_promotes_a_healthy_canary() -> None:
    book, ctl, rec, sim = loop_setup({"1": (0.0, 10.0), "2": (0.0, 10.0)})
    drive(ctl, sim, seconds=60)
    assert book.get("m").canary.state is CanaryState.PROMOTED, rec.actions
    assert rec.actions == ["traffic.canary.started", "traffic.canary.advanced", "traffic.canary.advanced", "traffic.canary.promoted"]
    # Evaluations happened one interval apart (plus the tick that opened each window).
    times = [e["details"]["window"]["evaluated_at"] for e in rec.events[1:]]
    assert all(10.0 <= b - a <= 12.0 for a, b in zip(times, times[1:]))
    assert_revisions_bump(rec)


@pytest.mark.parametrize(
    ("behaviour", "guardrail"),
    [
        ({"1": (0.0, 10.0), "2": (1.0, 10.0)}, "error_rate"),
        ({"1": (0.0, 10.0), "2": (0.0, 60.0)}, "p99_ratio"),
    ],
)
def test_run_loop_rolls_back_a_bad_canary_within_the_window(behaviour: dict[str, tuple[float, float]], guardrail: str) -> None:
    book, ctl, rec, sim = loop_setup(behaviour)
    drive(ctl, sim, seconds=40)
    final = book.get("m")
    assert final.canary.state is CanaryState.ROLLED_BACK and final.weights == {"1": 100}, rec.actions
    assert rec.actions == ["traffic.canary.started", "traffic.canary.analysis_failed", "traffic.canary.rolled_back"]
    assert rec.events[-1]["details"]["guardrail"] == guardrail
    # Rolled back within two analysis windows (failure_limit=2) plus the opening ticks.
    assert rec.events[-1]["details"]["window"]["evaluated_at"] <= 100.0 + 2 * 10.0 + 2


def test_run_loop_rolls_back_on_drift_alert() -> None:
    book, ctl, rec, sim = loop_setup({"1": (0.0, 10.0), "2": (0.0, 10.0)})
    ctl.on_drift_alert("m", "2", "DRIFT")
    drive(ctl, sim, seconds=40)
    assert book.get("m").canary.state is CanaryState.ROLLED_BACK
    assert rec.events[-1]["details"]["guardrail"] == "drift"
    assert rec.events[-1]["details"]["observed"] == "drift"


def test_run_loop_survives_a_broken_stats_provider() -> None:
    book, ctl, rec, sim = loop_setup({"1": (0.0, 10.0), "2": (0.0, 10.0)})

    class Broken(TrafficStats):
        def peek_window(self, model: str, version: str, now: float) -> VersionWindow:
            raise RuntimeError("boom")

    sim.stats = Broken()
    drive(ctl, sim, seconds=25)
    assert ctl.tick_errors >= 1 and book.get("m").canary.state is CanaryState.PROGRESSING


@pytest.mark.parametrize("judge", [None, "broken"])
def test_outcome_guardrails_that_cannot_be_evaluated_pause_inconclusive(judge: str | None) -> None:
    """A policy with outcome guardrails, and nothing that can judge them (no evaluator in the
    process, or one that raises): the canary pauses inconclusive, it never advances."""
    book, ctl, rec = setup(max_quality_drop={"accuracy": 0.05})
    if judge == "broken":
        def broken(model: str, spec: Any, now: float) -> list:
            raise RuntimeError("ledger gone")
        ctl.set_outcome_guardrails(broken)
    action = ctl.evaluate("m", 10.0, window("1", 1000), window("2", 100))
    assert action.kind == "inconclusive" and book.get("m").canary.state is CanaryState.INCONCLUSIVE
    verdict = next(g for g in rec.events[-1]["details"]["guardrails"] if g["guardrail"] == "outcomes")
    assert verdict["status"] == "inconclusive"
    assert ("ledger gone" if judge else "no outcome evaluator") in verdict["detail"]


def test_run_loop_waits_for_evidence_then_resumes_on_its_own() -> None:
    """7,421 canary requests after an inconclusive pause used to change nothing."""
    book, ctl, rec, sim = loop_setup({"1": (0.0, 10.0), "2": (0.0, 10.0)})
    idle = Sim(book, sim.stats, sim.behaviour)
    drive(ctl, idle, seconds=15, per_tick=0)  # no traffic at all: nothing to judge
    assert book.get("m").canary.state is CanaryState.INCONCLUSIVE, rec.actions
    drive(ctl, sim, seconds=60)  # traffic arrives: judged on the next ticks, no operator needed
    assert book.get("m").canary.state is CanaryState.PROMOTED, rec.actions
    assert rec.actions[:3] == ["traffic.canary.started", "traffic.canary.inconclusive", "traffic.canary.advanced"]
    assert rec.events[2]["details"]["resumed_from"] == "inconclusive"
    assert_revisions_bump(rec)


class MirroredSim(Sim):
    """Also carries out the policy's mirror: the shadow's answer agrees `agreement` of the time."""

    def __init__(self, book: PolicyBook, stats: TrafficStats, behaviour: dict[str, tuple[float, float]],
                 agreement: float) -> None:
        super().__init__(book, stats, behaviour)
        self.agreement = agreement

    def traffic(self, requests: int) -> None:
        for _ in range(requests):
            self.n += 1
            route = self.router.route("m", "", None, f"r{self.n}", ALL)
            self.stats.record("m", route.version, 10.0, True)
            if route.shadow_version is not None:
                label = self.rng.randrange(3)
                other = label if self.rng.random() < self.agreement else (label + 1) % 3
                self.stats.agreements.record("m", route.version, route.shadow_version,  # type: ignore[union-attr]
                                             {"y": np.eye(3)[[label]]}, {"y": np.eye(3)[[other]]})


@pytest.mark.parametrize(("agreement", "outcome"), [(0.21, CanaryState.ROLLED_BACK), (0.99, CanaryState.PROMOTED)])
def test_run_loop_judges_disagreement_over_the_mirror_it_set_up(agreement: float, outcome: CanaryState) -> None:
    """Issue 15 §7: --max-disagreement 0.1 without a mirror went to 100 % at 21 % agreement."""
    book, ctl, rec, _ = loop_setup({"1": (0.0, 10.0), "2": (0.0, 10.0)}, max_disagreement=0.1, mirror_percent=50)
    assert book.get("m").shadow == ShadowSpec("2", 50)
    sim = MirroredSim(book, TrafficStats(AgreementBook()), {}, agreement)
    drive(ctl, sim, seconds=80)
    final = book.get("m")
    assert final.canary.state is outcome, rec.actions
    assert final.shadow is None  # the mirror goes with the canary
    if outcome is CanaryState.ROLLED_BACK:
        assert rec.events[-1]["details"]["guardrail"] == "disagreement"
