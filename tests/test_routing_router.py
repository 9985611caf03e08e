"""Unit tests for routing.policy, routing.router and routing.shadow (no server)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockgate.errors import NotFound, PermissionDenied
from lockgate.routing import (
    AgreementBook,
    CanarySpec,
    CanaryState,
    NoServableVersion,
    PolicyBook,
    PolicyError,
    RouteDenied,
    Router,
    ShadowAgreement,
    ShadowSpec,
    StaleRevision,
    TrafficPolicy,
    UnknownVersion,
)
from lockgate.routing.policy import SPACE
from lockgate.routing.router import default_version, pick, sticky_point

ALL = lambda version: True  # noqa: E731 - every version may serve


def make_router(*policies: TrafficPolicy, **kwargs: object) -> tuple[PolicyBook, Router]:
    book = PolicyBook()
    for policy in policies:
        book.replace(policy)
    return book, Router(book, **kwargs)  # type: ignore[arg-type]


def canary_policy(percent_index: int, revision: int = 1, steps: tuple[int, ...] = (5, 25, 50, 100)) -> TrafficPolicy:
    spec = CanarySpec(stable="1", canary="2", steps=steps, step_index=percent_index)
    pct = steps[percent_index]
    return TrafficPolicy(model="m", revision=revision, weights={"1": 100 - pct, "2": pct}, canary=spec)


KEYS = [f"user-{i}" for i in range(10_000)]


def assign(router: Router, keys: list[str], model: str = "m") -> list[str]:
    return [router.route(model, "", key, None, ALL).version for key in keys]


# ------------------------------------------------------------------------------------ split
def test_weighted_split_90_10_by_request_id() -> None:
    _, router = make_router(TrafficPolicy("m", 1, {"1": 90, "2": 10}))
    n = 20_000
    counts = {"1": 0, "2": 0}
    for i in range(n):
        decision = router.route("m", "", None, f"req-{i}", ALL)
        assert decision.decision == "weighted" and decision.key_hash is None and decision.revision == 1
        counts[decision.version] += 1
    assert abs(counts["1"] / n * 100 - 90) <= 1.5
    assert abs(counts["2"] / n * 100 - 10) <= 1.5


def test_weighted_split_without_request_id_uses_prng() -> None:
    import random

    _, router = make_router(TrafficPolicy("m", 1, {"1": 9, "2": 1}), rng=random.Random(7))
    n = 20_000
    canary = sum(router.route("m", "", None, None, ALL).version == "2" for _ in range(n))
    assert abs(canary / n * 100 - 10) <= 1.5


def test_request_id_draw_is_deterministic_across_routers() -> None:
    _, a = make_router(TrafficPolicy("m", 1, {"1": 50, "2": 50}))
    _, b = make_router(TrafficPolicy("m", 1, {"1": 50, "2": 50}))
    ids = [f"r{i}" for i in range(500)]
    assert [a.route("m", "", None, i, ALL).version for i in ids] == [b.route("m", "", None, i, ALL).version for i in ids]


def test_normalised_weights_and_zero_weight_version() -> None:
    policy = TrafficPolicy("m", 1, {"1": 9, "2": 1, "3": 0})
    assert policy.percent_of("1") == 90 and policy.percent_of("2") == 10 and policy.percent_of("3") == 0
    assert policy.versions == ("1", "2")
    _, router = make_router(policy)
    assert all(router.route("m", "", None, f"q{i}", ALL).version != "3" for i in range(2000))


# ------------------------------------------------------------------------------------ stickiness
def test_sticky_keys_stable_under_unchanged_weights_and_recreated_router() -> None:
    policy = TrafficPolicy("m", 3, {"1": 70, "2": 20, "10": 10})
    _, router = make_router(policy)
    first = assign(router, KEYS)
    assert assign(router, KEYS) == first  # 100 % stable on the same router
    # A re-created snapshot (JSON round trip, different dict insertion order) and router.
    rebuilt = TrafficPolicy.from_json(policy.to_json())
    shuffled = TrafficPolicy("m", 4, {"10": 10, "2": 20, "1": 70})
    for other in (rebuilt, shuffled):
        _, router2 = make_router(other)
        assert assign(router2, KEYS) == first
    decision = router.route("m", "", "user-1", None, ALL)
    assert decision.decision == "sticky" and decision.key_hash is not None
    assert set(first) == {"1", "2", "10"}


def test_sticky_hash_is_not_salted_per_process() -> None:
    policy = TrafficPolicy("m", 1, {"1": 50, "2": 30, "3": 20})
    _, router = make_router(policy)
    here = hashlib.sha256(",".join(assign(router, KEYS)).encode()).hexdigest()
    script = (
        "import hashlib\n"
        "from lockgate.routing import PolicyBook, Router, TrafficPolicy\n"
        "b = PolicyBook(); b.replace(TrafficPolicy('m', 1, {'1': 50, '2': 30, '3': 20}))\n"
        "r = Router(b)\n"
        "v = [r.route('m', '', f'user-{i}', None, lambda _: True).version for i in range(10000)]\n"
        "print(hashlib.sha256(','.join(v).encode()).hexdigest())\n"
    )
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True)
        assert out.stdout.strip() == here


def test_keys_only_move_stable_to_canary_as_canary_grows() -> None:
    book, router = make_router(TrafficPolicy("m", 0, {"1": 100}))
    previous = assign(router, KEYS)
    assert set(previous) == {"1"}
    for index, pct in enumerate((5, 25, 50, 100)):
        book.replace(canary_policy(index, revision=index + 1))
        current = assign(router, KEYS)
        moved_back = sum(1 for a, b in zip(previous, current) if a == "2" and b != "2")
        assert moved_back == 0
        assert all(b == a or (a == "1" and b == "2") for a, b in zip(previous, current))
        share = current.count("2") / len(KEYS) * 100
        assert abs(share - pct) <= 1.5
        previous = current
    assert set(previous) == {"2"}


def test_plain_two_version_weights_are_monotone_too() -> None:
    book, router = make_router(TrafficPolicy("m", 1, {"1": 100, "2": 0}))
    previous = assign(router, KEYS[:3000])
    for revision, pct in enumerate((10, 40, 80), start=2):
        book.replace(TrafficPolicy("m", revision, {"1": 100 - pct, "2": pct}))
        current = assign(router, KEYS[:3000])
        assert all(b == a or (a == "1" and b == "2") for a, b in zip(previous, current))
        previous = current


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 100), st.integers(0, 100))
def test_canary_layout_monotone_for_any_pair_of_weights(a: int, b: int) -> None:
    low, high = sorted((a, b))
    policies = []
    for pct in (low, high):
        spec = CanarySpec(stable="7", canary="12", steps=(max(pct, 1),))
        policies.append(TrafficPolicy("m", 1, {"7": 100 - pct, "12": pct}, canary=spec))
    p_low, p_high = policies
    for point in range(0, SPACE, 7):
        if pick(p_low, point) == "12":
            assert pick(p_high, point) == "12"


def test_sticky_point_depends_on_model() -> None:
    points_a = [sticky_point("a", k) for k in KEYS[:200]]
    points_b = [sticky_point("b", k) for k in KEYS[:200]]
    assert points_a != points_b
    assert all(0 <= p < SPACE for p in points_a)
    # Tools can predict the router: sticky_point + pick give the routed version.
    policy = TrafficPolicy("a", 1, {"1": 60, "2": 40})
    _, router = make_router(policy)
    for key, point in zip(KEYS[:200], points_a):
        decision = router.route("a", "", key, None, ALL)
        assert decision.key_hash is not None and decision.key_hash % SPACE == point
        assert decision.version == pick(policy, point)


def test_non_sticky_policy_ignores_key() -> None:
    _, router = make_router(TrafficPolicy("m", 1, {"1": 50, "2": 50}, sticky=False))
    decision = router.route("m", "", "user-1", "rid-1", ALL)
    assert decision.decision == "weighted"


# ------------------------------------------------------------------------------------ pin / gates
def test_pin_servable_and_denied_with_reason() -> None:
    states = {"1": "approved", "2": "serving", "3": "validated"}
    _, router = make_router(TrafficPolicy("m", 1, {"1": 100}), state_of=lambda m, v: states.get(v))
    servable = lambda v: states.get(v) in ("approved", "serving", "canary")  # noqa: E731
    decision = router.route("m", "2", "user-1", "rid", servable)
    assert (decision.version, decision.decision) == ("2", "pinned")
    with pytest.raises(RouteDenied) as denied:
        router.route("m", "3", None, "rid", servable)
    assert str(denied.value) == "version 3 of model 'm' is not approved to serve (state: validated)"
    assert isinstance(denied.value, PermissionDenied) and denied.value.code == "PERMISSION_DENIED"
    with pytest.raises(UnknownVersion) as unknown:
        router.route("m", "9", None, "rid", servable)
    assert isinstance(unknown.value, NotFound) and "9" in str(unknown.value)
    assert router.counters()["denied"] == 2


def test_pin_denied_without_state_lookup() -> None:
    _, router = make_router(TrafficPolicy("m", 1, {"1": 100}))
    with pytest.raises(RouteDenied, match="version 4 of model 'm' is not approved to serve"):
        router.route("m", "4", None, None, lambda v: v == "1")


def test_policy_routing_to_unapproved_version_fails_closed() -> None:
    _, router = make_router(TrafficPolicy("m", 5, {"2": 100}), state_of=lambda m, v: "retired")
    with pytest.raises(RouteDenied, match="policy revision 5 of model 'm' routes to version 2.*retired"):
        router.route("m", "", None, "rid", lambda v: v == "1")


def test_default_route_without_policy() -> None:
    _, router = make_router()
    decision = router.route("known", "", "key", "rid", ALL, configured_default="4", loaded=("3", "4"))
    assert (decision.version, decision.decision, decision.revision) == ("4", "default", -1)
    with pytest.raises(NoServableVersion):
        router.route("other", "", None, None, ALL)
    with pytest.raises(RouteDenied, match="default route of model 'known' routes to version 4"):
        router.route("known", "", None, None, lambda v: False, configured_default="4", loaded=("3", "4"))


def test_default_version_is_decided_by_one_rule() -> None:
    """The configured default if it may serve, else the highest servable loaded version; the
    same rule behind the router, the pipeline without a control plane and the admin API."""
    assert default_version("2", ("1", "2", "10"), ALL) == "2"
    assert default_version("2", ("1", "2", "10"), lambda v: v != "2") == "10"
    assert default_version("2", ("1", "2", "9", "10"), lambda v: v in ("1", "9")) == "9"
    assert default_version("2", ("1", "2"), lambda v: False) == "2"  # refused by the gate, naming its state
    _, router = make_router()
    decision = router.route("m", "", None, "r", lambda v: v != "2", configured_default="2", loaded=("1", "2", "3"))
    assert decision.version == "3" and decision.decision == "default"
    # one immutable decision per version, shared by every request
    assert router.route("m", "", None, "s", lambda v: v != "2", configured_default="2", loaded=("1", "2", "3")) is decision


# ------------------------------------------------------------------------------------ shadow
def test_shadow_fraction_and_determinism() -> None:
    policy = TrafficPolicy("m", 1, {"1": 100}, shadow=ShadowSpec("2", 20))
    _, router = make_router(policy)
    servable = lambda v: v == "1"  # noqa: E731
    shadowable = lambda v: v in ("1", "2")  # noqa: E731
    n = 20_000
    mirrored = [router.route("m", "", None, f"req-{i}", servable, shadowable).shadow_version for i in range(n)]
    assert set(mirrored) <= {None, "2"}
    assert abs(mirrored.count("2") / n * 100 - 20) <= 1.5
    again = [router.route("m", "", None, f"req-{i}", servable, shadowable).shadow_version for i in range(200)]
    assert again == mirrored[:200]
    assert router.counters()["shadowed"] == mirrored.count("2") + again.count("2")


def test_shadow_not_shadowable_or_same_version_is_skipped_and_counted() -> None:
    policy = TrafficPolicy("m", 1, {"1": 100}, shadow=ShadowSpec("2", 100))
    _, router = make_router(policy)
    decision = router.route("m", "", None, "r", lambda v: v == "1", lambda v: False)
    assert decision.shadow_version is None
    assert router.counters()["shadow_skipped_not_shadowable"] == 1
    # Without a shadowable gate the stricter servable gate applies.
    assert router.route("m", "", None, "r", lambda v: v == "1").shadow_version is None
    assert router.counters()["shadow_skipped_not_shadowable"] == 2
    # A request pinned to the shadow version is not mirrored to itself.
    assert router.route("m", "2", None, "r", ALL).shadow_version is None
    assert router.counters()["shadow_skipped_same_version"] == 1
    assert router.route("m", "", None, "r", ALL).shadow_version == "2"


def test_shadow_zero_percent_never_mirrors() -> None:
    _, router = make_router(TrafficPolicy("m", 1, {"1": 100}, shadow=ShadowSpec("2", 0)))
    assert all(router.route("m", "", None, f"r{i}", ALL).shadow_version is None for i in range(1000))


def test_agreement_accumulator_on_hand_made_outputs() -> None:
    acc = ShadowAgreement("m", "1", "2")
    p1 = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    s1 = np.array([[0.8, 0.2], [0.7, 0.3], [0.6, 0.4]], dtype=np.float32)  # row 1 flips
    acc.record({"probs": p1}, {"probs": s1})
    p2 = np.array([[0.5, 0.5]], dtype=np.float32)
    acc.record({"probs": p2}, {"probs": p2.copy()})
    snap = acc.snapshot()
    assert snap.count == 2
    assert (snap.compared_rows, snap.agreed_rows) == (4, 3)
    assert snap.agreement_rate == pytest.approx(0.75)
    assert snap.disagreement_rate == pytest.approx(0.25)
    diffs = np.abs(np.concatenate([(p1 - s1).ravel(), np.zeros(2)]).astype(np.float64))
    assert snap.max_abs_diff == pytest.approx(0.5, abs=1e-6)
    assert snap.mean_abs_diff == pytest.approx(float(diffs.mean()), abs=1e-6)
    assert snap.mismatched == 0


def test_agreement_labels_nan_and_mismatches() -> None:
    acc = ShadowAgreement("m", "1", "2")
    acc.record({"label": np.array([1, 2, 3, 4])}, {"label": np.array([1, 2, 0, 4])})
    snap = acc.snapshot()
    assert (snap.compared_rows, snap.agreed_rows, snap.max_abs_diff) == (4, 3, 3.0)
    acc.record({"score": np.array([np.nan, 1.0])}, {"score": np.array([np.nan, np.nan])})
    assert acc.snapshot().max_abs_diff == float("inf")
    acc.reset()
    acc.record({"probs": np.zeros((3, 2))}, {"probs": np.zeros((2, 2))})  # wrong shape
    acc.record({"probs": np.zeros((2, 2))}, {})  # missing output
    snap = acc.snapshot()
    assert snap.mismatched == 2
    assert (snap.compared_rows, snap.agreed_rows) == (5, 0)
    assert snap.to_dict()["per_output"]["probs"]["mismatched"] == 2


def test_agreement_book_disagreement_either_direction() -> None:
    book = AgreementBook()
    a = np.array([[1.0, 0.0], [1.0, 0.0]])
    b = np.array([[1.0, 0.0], [0.0, 1.0]])
    book.record("m", "1", "2", {"y": a}, {"y": b})
    book.record("m", "2", "1", {"y": a}, {"y": a})
    assert book.disagreement("m", "2", "1") == pytest.approx(0.25)
    assert book.disagreement("m", "1", "3") is None
    assert [s.primary for s in book.snapshots("m")] == ["1", "2"]
    book.reset("m", "1", "2")
    assert book.disagreement("m", "1", "2") is None


# ------------------------------------------------------------------------------------ policy
def test_policy_json_round_trip_with_shadow_and_canary() -> None:
    spec = CanarySpec(stable="1", canary="2", steps=(5, 50, 100), interval_s=30, step_index=1, failures=1)
    policy = TrafficPolicy("m", 9, {"1": 50, "2": 50}, sticky=False, shadow=ShadowSpec("3", 12.5), canary=spec)
    again = TrafficPolicy.from_json(policy.to_json())
    assert again == policy
    assert again.order == ("2", "1")  # the active canary's range comes first
    assert json.loads(policy.to_json())["canary"]["state"] == "progressing"
    assert again.to_json() == policy.to_json()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": "m", "weights": {"1": -1}}, "non-negative"),
        ({"model": "m", "weights": {"1": 0}}, "all be zero"),
        ({"model": "m", "weights": {}}, "no versions"),
        ({"model": "m", "weights": {"1": 1.5}}, "non-negative integer"),
        ({"model": "m", "weights": {"1": 100}, "shadow": {"version": "2", "percent": 101}}, r"\[0, 100\]"),
        ({"model": "m", "weights": {"1": 100}, "shadow": {"version": "2", "percent": -1}}, r"\[0, 100\]"),
        ({"model": "m", "weights": {"1": 100}, "canary": {"stable": "1", "canary": "2"}}, "no weight entry"),
        ({"model": "m", "weights": {"1": 95, "2": 5}, "canary": {"stable": "1", "canary": "2", "steps": [50, 5]}}, "increasing"),
        ({"weights": {"1": 100}}, "missing field 'model'"),
    ],
)
def test_policy_validation(data: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        TrafficPolicy.from_json(json.dumps(data))


def test_policy_is_immutable_and_check_versions() -> None:
    policy = TrafficPolicy("m", 1, {"1": 100}, shadow=ShadowSpec("4", 5))
    with pytest.raises(AttributeError):
        policy.revision = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.weights["1"] = 5  # type: ignore[index]
    policy.check_versions({"1", "4"})
    with pytest.raises(PolicyError, match="no version"):
        policy.check_versions({"1"})
    assert policy.evolve(weights={"1": 1}).revision == 2


def test_policy_book_swaps_atomically_and_rejects_stale() -> None:
    book = PolicyBook()
    first = book.replace(TrafficPolicy("m", 1, {"1": 100}))
    with pytest.raises(StaleRevision):
        book.replace(TrafficPolicy("m", 1, {"2": 100}))
    with pytest.raises(StaleRevision):
        book.replace(first.evolve(weights={"2": 100}), expect_revision=0)
    second = book.replace(first.evolve(weights={"2": 100}), expect_revision=1)
    assert book.get("m") is second and "m" in book and len(book) == 1

    # Readers racing a writer only ever see whole snapshots.
    stop = threading.Event()
    seen_bad: list[object] = []

    def reader() -> None:
        while not stop.is_set():
            p = book.get("m")
            assert p is not None
            if sum(p.points.values()) != SPACE or p.bounds[-1] != SPACE or set(p.order) != set(p.weights):
                seen_bad.append(p)

    thread = threading.Thread(target=reader)
    thread.start()
    current = second
    for i in range(300):
        weights = {"1": i % 100 + 1, "2": 100 - i % 100} if i % 2 else {"3": 100}
        current = book.replace(current.evolve(weights=weights))
    stop.set()
    thread.join()
    assert not seen_bad
    assert book.remove("m") is current and book.get("m") is None


def test_terminal_canary_uses_plain_layout() -> None:
    spec = CanarySpec(stable="1", canary="2", state=CanaryState.ROLLED_BACK)
    policy = TrafficPolicy("m", 3, {"1": 100}, canary=spec)
    assert policy.order == ("1",)
